"""The speed/accuracy front: top-k precision configs exported by each backend and measured
through the validation harness (tiny variant, 64x64; the TensorRT Q/DQ ONNX, which ONNX Runtime
runs here: the front measures an artifact with whichever backend runs it. OpenVINO's mixed
export is tested in test_openvino.py)."""
from __future__ import annotations

import json

import pytest

from lrformer_edge import create_model
from lrformer_edge.backends import load_runner
from lrformer_edge.models.layers import quantizable_layers
from lrformer_edge.quant.selection import Rankings
from lrformer_edge.validation.front import front_backends

pytest.importorskip("nncf")

SIZE = (64, 64)


@pytest.fixture(scope="module")
def model():
    return create_model("lrformer-test")


def _rankings(model) -> Rankings:
    """A ranking in the form a sensitivity run writes (here the model's layers in reverse
    module order)."""
    names = tuple(reversed([layer.name for layer in quantizable_layers(model)]))
    return Rankings(model.config.name, model.checkpoint_sha256 or "none (untrained)", SIZE,
                    {"int8": names}, {"int8": {}})


def test_front_backends_are_those_that_export_the_scheme():
    names = [backend.name for backend, _ in front_backends(("int8",))]
    assert {"openvino", "tensorrt"} <= set(names)
    assert "coreml" in [b.name for b, scheme in front_backends(("palette4",))]
    with pytest.raises(ValueError, match="no front for pytorch: fronts exist for"):
        front_backends(("int8",), ["pytorch"])


@pytest.mark.slow
def test_front_cli_exports_and_measures_each_point(model, tmp_path, capsys):
    from calibration.front import main

    report = tmp_path / "sensitivity.json"
    report.write_text(json.dumps({"rankings": _rankings(model).to_dict()}))
    out = tmp_path / "front"
    code = main(["--variant", "lrformer-test", "--sensitivity", str(report), "--backend",
                 "tensorrt", "--k", "1", "--images", "2",
                 "--calib-images", "2", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    document = json.loads((out / "front.json").read_text())
    points = document["points"]
    assert [(p["backend"], p["k"]) for p in points] == [("tensorrt", 1)]
    for point in points:
        assert point["status"] == "ok", point
        assert 0.0 < point["agreement"] <= 1.0 and point["median_ms"] > 0
        assert point["size_mib"] > 0
        recorded = load_runner(point["artifact"]).metadata["precision_config"]
        assert recorded["float_layers"] == list(_rankings(model).orders["int8"][:point["k"]])
        assert point["measured_by"] == "onnxruntime"
    page = (out / "front.html").read_text()
    assert page.count("<svg") == 2  # agreement and mIoU against latency
    assert "tensorrt (int8)" in page


def test_front_cli_refuses_a_ranking_of_another_size(model, tmp_path, capsys):
    from calibration.front import main

    report = tmp_path / "sensitivity.json"
    report.write_text(json.dumps({"rankings": _rankings(model).to_dict()}))
    code = main(["--variant", "lrformer-test", "--sensitivity", str(report), "--input-size",
                 "96", "96", "--output", str(tmp_path / "front")])
    assert code == 2
    err = capsys.readouterr().err
    assert "input size 64x64 (exporting 96x96)" in err and "\n" == err[-1]
    assert not (tmp_path / "front").exists()
