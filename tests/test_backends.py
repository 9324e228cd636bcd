"""The backend registry: records, lookup by name and by artifact, the gate vocabulary and the
runtime options the CLIs offer."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from lrformer_edge.backends import (
    ARTIFACT_SUFFIXES,
    BACKENDS,
    GROUND_TRUTH,
    backend_for,
    get_backend,
    load_runner,
    resolve_backend_options,
)
from lrformer_edge.backends.onnxruntime.export import export_onnx
from lrformer_edge.backends.tensorrt.sidecar import sidecar_path
from lrformer_edge.files import CHECKPOINT_SUFFIXES
from lrformer_edge.models.factory import create_model
from lrformer_edge.validation.gate import load_thresholds
from lrformer_edge.validation.harness import describe_artifact, reportable_precisions

REPO = Path(__file__).resolve().parents[1]
NAMES = ("pytorch", "onnxruntime", "openvino", "tensorrt", "coreml", "executorch", "litert")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("backends") / "tiny.onnx"
    export_onnx(create_model("lrformer-test"), path, (64, 64))
    return path


def test_registry_lists_every_backend_once_the_ground_truth_first():
    assert tuple(b.name for b in BACKENDS) == NAMES
    suffixes = [s for b in BACKENDS for s in b.suffixes]
    assert len(suffixes) == len(set(suffixes)) and ARTIFACT_SUFFIXES == tuple(suffixes)
    assert all(get_backend(name).name == name for name in NAMES)
    assert GROUND_TRUTH is BACKENDS[0] and GROUND_TRUTH.precisions == ("fp32",)
    with pytest.raises(ValueError, match="unknown backend 'openvno'; known: " + ", ".join(NAMES)):
        get_backend("openvno")


def test_checkpoint_suffixes_are_one_tuple():
    """models.checkpoint and the pytorch backend used to disagree (.bin)."""
    from lrformer_edge.models import checkpoint

    assert get_backend("pytorch").suffixes == CHECKPOINT_SUFFIXES == checkpoint.CHECKPOINT_SUFFIXES
    assert ".bin" not in ARTIFACT_SUFFIXES  # an OpenVINO IR's weights, not an artifact


def test_records_declare_what_they_offer():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for backend in BACKENDS:
        assert backend.extra is None or backend.extra in extras, backend.name
        # an artifact exported at any offered precision (default options) has a gate key
        assert set(backend.precisions) <= set(backend.precision_keys), backend.name
        assert backend.open_runner and backend.describe
    assert [b.name for b in BACKENDS if not b.exact_int8_accumulation] == ["openvino"]
    assert [b.extra for b in BACKENDS] == [None, None, "openvino", "tensorrt-runtime", "coreml",
                                           "executorch", "litert"]
    # TensorRT-ready ONNX (fp16, Q/DQ int8) run in ONNX Runtime too, and are gated there.
    assert set(get_backend("tensorrt").precisions) <= set(get_backend("onnxruntime").precision_keys)
    for name in ("onnxruntime", "openvino", "tensorrt", "coreml"):
        assert callable(get_backend(name).export)
    for name in ("openvino", "tensorrt", "coreml"):
        assert callable(get_backend(name).quantize)


@pytest.mark.parametrize("backend", BACKENDS, ids=NAMES)
def test_backend_for_each_suffix(backend, tmp_path):
    for suffix in backend.suffixes:
        assert backend_for(tmp_path / f"model{suffix}") is backend


def test_an_openvino_folder_is_recognised_by_what_it_holds(tmp_path):
    folder = tmp_path / "lrformer-int8"
    folder.mkdir()
    with pytest.raises(ValueError, match="cannot tell which backend"):
        backend_for(folder)  # empty: nothing says what it is
    (folder / "lrformer.xml").write_text("<net/>")
    assert backend_for(folder).name == "openvino"
    package = tmp_path / "m.mlpackage"  # the suffix decides before the contents
    package.mkdir()
    (package / "stray.xml").write_text("<x/>")
    assert backend_for(package).name == "coreml"


def test_an_unknown_artifact_names_every_kind(tmp_path):
    path = tmp_path / "model.h5"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_runner(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError) as error:
        load_runner(path)
    message = str(error.value)
    assert message.startswith(f"cannot tell which backend runs {path}: expected one of ")
    assert all(suffix in message for suffix in ARTIFACT_SUFFIXES)
    assert "OpenVINO IR (.xml, or the folder holding one)" in message
    assert all(backend.title in message for backend in BACKENDS)


def test_every_backend_has_a_row_in_the_shipped_thresholds():
    rows = load_thresholds()["backends"]
    assert [b.gate_key for b in BACKENDS if b.gate_key not in rows] == []
    assert set(reportable_precisions()) == {b.gate_key for b in BACKENDS}


def test_described_precisions_are_gate_keys(tiny_onnx, tmp_path):
    """What describe reports for real artifacts is in its record's vocabulary."""
    onnx = describe_artifact(tiny_onnx)
    assert (onnx.backend, onnx.precision) == ("onnxruntime", "fp32")
    assert onnx.metadata["variant"] == "lrformer-test" and onnx.runner_options == {}
    assert onnx.precision in get_backend("onnxruntime").precision_keys
    checkpoint = describe_artifact(tmp_path / "model.pth")  # read from the name alone
    assert (checkpoint.backend, checkpoint.precision, checkpoint.metadata) == \
        ("pytorch", "fp32", None)
    tensorrt = get_backend("tensorrt")
    for precision in tensorrt.precisions:
        engine = tmp_path / f"{precision}.engine"
        engine.write_bytes(b"engine bytes")
        sidecar_path(engine).write_text(json.dumps(
            {"precision": precision, "metadata": {"lrformer_edge.input_size": "[64, 64]"}}))
        described = describe_artifact(engine)
        assert described.precision == precision and precision in tensorrt.precision_keys
        assert described.metadata == {"input_size": [64, 64]}


def test_described_openvino_precision_follows_the_hint(tiny_onnx, tmp_path):
    ov = pytest.importorskip("openvino")
    import onnx

    from lrformer_edge.backends.openvino.describe import precision_key
    from lrformer_edge.backends.openvino.ir import IR_PRECISIONS, write_rt_metadata
    from lrformer_edge.backends.openvino.runner import PRECISIONS

    model = ov.convert_model(str(tiny_onnx))  # an IR with our metadata, without export's checks
    props = {p.key: p.value for p in onnx.load(str(tiny_onnx)).metadata_props}
    write_rt_metadata(model, {**props, "lrformer_edge.weights_precision": "int8"})
    ov.save_model(model, str(tmp_path / "ir" / "tiny.xml"))
    openvino = get_backend("openvino")
    for hint in PRECISIONS:
        described = describe_artifact(tmp_path / "ir", {"openvino": {"precision": hint}})
        assert described.precision == ("int8" if hint == "f32" else f"int8+{hint}")
        assert described.precision in openvino.precision_keys
        assert described.runner_options == {"precision": hint, "emulate_exact_int8": False}
    assert {precision_key(w, h) for w in IR_PRECISIONS for h in PRECISIONS} == \
        set(openvino.precision_keys)


def test_backend_options_fill_defaults_and_refuse_what_is_unknown():
    options = resolve_backend_options({"openvino": {"precision": "bf16"}})
    assert options["openvino"] == {"precision": "bf16", "emulate_exact_int8": False}
    assert set(options) == set(NAMES) and options["onnxruntime"] == {}
    with pytest.raises(ValueError, match="unknown backend 'openvno'"):
        resolve_backend_options({"openvno": {}})
    with pytest.raises(ValueError, match=r"unknown runtime option\(s\) \['precison'\] for "
                                         r"backend openvino; known: \['emulate_exact_int8', "
                                         r"'precision'\]"):
        resolve_backend_options({"openvino": {"precison": "bf16"}})
    with pytest.raises(ValueError, match=r"openvino option precision must be one of "
                                         r"\('f32', 'bf16', 'f16'\), got 'int4'"):
        resolve_backend_options({"openvino": {"precision": "int4"}})
    with pytest.raises(ValueError, match="unknown runtime option"):
        resolve_backend_options({"onnxruntime": {"precision": "bf16"}})


def test_openvino_option_defaults_are_the_runners():
    from lrformer_edge.backends.openvino.runner import PRECISIONS, OpenVINORunner

    parameters = inspect.signature(OpenVINORunner).parameters
    for option in get_backend("openvino").runtime_options:
        assert option.default == parameters[option.name].default
    assert get_backend("openvino").runtime_options[0].choices == PRECISIONS


def _validate_parser():
    sys.path.insert(0, str(REPO / "deploy"))
    try:
        import validate
    finally:
        sys.path.pop(0)
    return validate


def test_runtime_options_make_the_validate_flags():
    validate = _validate_parser()
    base = ["--artifacts", "m.onnx", "--report", "r"]
    defaults = validate.parse_args(base)
    from lrformer_edge.cli import backend_options_from_args

    assert backend_options_from_args(defaults) == {
        b.name: b.option_defaults() for b in BACKENDS if b.runtime_options}
    for backend in BACKENDS:
        for option in backend.runtime_options:
            flag = backend.option_flag(option)
            value = True if option.is_switch else option.choices[-1]
            args = validate.parse_args(base + ([flag] if option.is_switch else [flag, value]))
            assert backend_options_from_args(args)[backend.name][option.name] == value
    # The spellings the README and users call.
    chosen = validate.parse_args(base + ["--openvino-precision", "bf16", "--emulate-exact-int8"])
    assert backend_options_from_args(chosen)["openvino"] == {"precision": "bf16",
                                                             "emulate_exact_int8": True}
    with pytest.raises(SystemExit):
        validate.parse_args(base + ["--openvino-precision", "int8"])


def test_demo_runner_options_apply_to_the_backend_that_declares_them(tiny_onnx, tmp_path):
    import argparse

    from lrformer_edge.cli import add_runner_option_arguments, runner_options_from_args

    parser = argparse.ArgumentParser()
    add_runner_option_arguments(parser)
    ir = tmp_path / "ir"
    ir.mkdir()
    (ir / "m.xml").write_text("<net/>")
    assert runner_options_from_args(parser.parse_args([]), tiny_onnx) == {}
    given = parser.parse_args(["--precision", "bf16", "--emulate-exact-int8"])
    assert runner_options_from_args(given, ir) == {"precision": "bf16",
                                                   "emulate_exact_int8": True}
    with pytest.raises(ValueError, match="--precision applies to OpenVINO IR artifacts only, "
                                         f"not to {tiny_onnx}"):
        runner_options_from_args(parser.parse_args(["--precision", "bf16"]), tiny_onnx)
    with pytest.raises(ValueError, match="not to the default PyTorch model"):
        runner_options_from_args(parser.parse_args(["--emulate-exact-int8"]), None)


def test_the_registry_loads_without_pytorch_or_sdks():
    """Devices gate artifacts with a saved reference and no PyTorch; SDKs load when used."""
    script = ("import sys; sys.modules['torch'] = None\n"
              "import lrformer_edge.backends, lrformer_edge.validation.gate, lrformer_edge.cli\n"
              "sdks = ('openvino', 'nncf', 'coremltools', 'tensorrt', 'onnxruntime')\n"
              "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(sdks)}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
