"""One calibration statistics pass shared by every NNCF target (``activation_statistics``,
``nncf_collectors``): what it gives NNCF's collectors equals what NNCF's own pass measures, on
the OpenVINO graph and on the constant-folded ONNX graph of the TensorRT export, and a TensorRT
export reads the activations an OpenVINO export measured."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lrformer_edge.backends.nncf_statistics import StatisticsCache, StatisticsKey
from lrformer_edge.data.calibration import build_calibration_set

SIZE = (64, 96)
# NNCF's key of a statistic on weights: {class}_{node}_{target type 5}_{port}
WEIGHTS = re.compile(r"_5_\d+$")

pytest.importorskip("nncf", reason="needs the openvino or tensorrt extra")


@pytest.fixture(scope="module")
def calibration(tiny_model):
    return build_calibration_set("procedural", tiny_model.config.data, SIZE, 3, seed=0)


@pytest.fixture(scope="module")
def fp32_onnx(tiny_model, tmp_path_factory):
    from lrformer_edge.backends.onnxruntime.export import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("fp32") / "fp32.onnx", SIZE).path


def _quantized_twice(quantize, tiny_model, calibration, tmp_path, capsys):
    """The backend's entry of a cache filled by NNCF's own pass, of one filled through the
    shared pass, and what the shared one logged."""
    key = StatisticsKey.of(tiny_model, SIZE, calibration)
    own = StatisticsCache(key, tmp_path / "nncf.npz")
    quantize(own, None)
    capsys.readouterr()
    shared = StatisticsCache(key, tmp_path / "shared.npz")
    quantize(shared, True)
    log = capsys.readouterr().out
    backend = [name for name in own.entries if not name.startswith("onnx-activations")]
    assert len(backend) == 1
    return own.entries[backend[0]], shared.entries[backend[0]], log


def _assert_same_statistics(own: dict, shared: dict) -> None:
    assert own.keys() == shared.keys()
    for key, fields in own.items():
        assert fields.keys() == shared[key].keys(), key
        for field, array in fields.items():
            np.testing.assert_allclose(
                shared[key][field], array, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(array).max()),
                err_msg=f"{key} {field}")


def _assert_nncf_read_only_weights(own: dict, log: str) -> None:
    assert _counts(log) == (sum(not WEIGHTS.search(key) for key in own),
                            sum(bool(WEIGHTS.search(key)) for key in own))


def _counts(log: str) -> tuple[int, int]:
    shared = re.search(r"(\d+) from the shared activation pass", log)
    by_nncf = re.search(r"(\d+) by NNCF", log)
    return int(shared.group(1)) if shared else 0, int(by_nncf.group(1)) if by_nncf else 0


@pytest.mark.slow
def test_openvino_gets_from_the_shared_pass_what_nncf_measures(
        tiny_model, calibration, fp32_onnx, tmp_path, capsys):
    ov = pytest.importorskip("openvino", reason="needs the openvino extra")
    from lrformer_edge.backends.openvino.ptq import quantize_openvino

    def quantize(cache, shared):
        quantize_openvino(ov.convert_model(str(fp32_onnx)), tiny_model, calibration,
                          statistics_cache=cache, fp32_onnx=fp32_onnx if shared else None)

    own, shared, log = _quantized_twice(quantize, tiny_model, calibration, tmp_path, capsys)
    _assert_same_statistics(own, shared)
    # Every activation, the convolutions' WithoutBiases outputs and OpenVINO's x * s of a layer
    # scale after a biased layer included; NNCF reads only the weights.
    _assert_nncf_read_only_weights(own, log)


@pytest.mark.slow
def test_tensorrt_gets_from_the_shared_pass_what_nncf_measures(
        tiny_model, calibration, fp32_onnx, tmp_path, capsys):
    from lrformer_edge.backends.tensorrt.export import fold_constants
    from lrformer_edge.backends.tensorrt.qdq import quantize_qdq

    folded = fold_constants(fp32_onnx, tmp_path / "folded.onnx")

    def quantize(cache, shared):
        import copy

        quantize_qdq(copy.deepcopy(folded), calibration, cache,
                     fp32_onnx=fp32_onnx if shared else None)

    own, shared, log = _quantized_twice(quantize, tiny_model, calibration, tmp_path, capsys)
    _assert_same_statistics(own, shared)
    # Every activation, Gemms that ONNX Runtime fused from MatMul+Add included; NNCF reads
    # only the weights (from one image).
    _assert_nncf_read_only_weights(own, log)


@pytest.mark.slow
def test_a_tensorrt_export_reads_the_activations_an_openvino_export_measured(
        tiny_model, calibration, tmp_path, capsys):
    pytest.importorskip("openvino", reason="needs the openvino extra")
    from lrformer_edge.backends.openvino.export import export_openvino
    from lrformer_edge.backends.tensorrt.export import export_tensorrt_onnx

    cache = tmp_path / "stats.npz"
    export_openvino(tiny_model, tmp_path / "ov", SIZE, "int8", calibration=calibration,
                    statistics_cache=cache)
    assert "(measured now)" in capsys.readouterr().out
    result = export_tensorrt_onnx(tiny_model, tmp_path / "trt.onnx", SIZE, "int8", calibration,
                                  statistics_cache=cache)
    log = capsys.readouterr().out
    from_pass, by_nncf = _counts(log)
    assert "from the shared activation pass (reused)" in log and from_pass > 0
    entries = StatisticsCache(StatisticsKey.of(tiny_model, SIZE, calibration), cache).entries
    onnx_entry = next(v for k, v in entries.items() if k.startswith("ONNXStatistics"))
    weights = sum(bool(WEIGHTS.search(key)) for key in onnx_entry)
    assert by_nncf == weights, "NNCF measured activations itself"
    assert Path(result.path).is_file() and result.parity.pixel_agreement > 0.5
