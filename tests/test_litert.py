"""LiteRT models (.tflite): export with parity and metadata, FP16 and INT8 by ai-edge-quantizer,
the runner (threads, input checks), the errors for damaged and foreign .tflite files, the
registry and the gate reaching it, the command line.

One FP32 conversion (tiny variant, 64x64, about 100 s here) serves most tests. The FP16 and INT8
models are exported from it: ``export_litert`` with its litert-torch step answered by that
conversion's own output, so quantization, metadata, parity check and write are the export's.
One INT8 export through the command line converts again, end to end.
"""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

EXTRA_NEEDED = ("LiteRT export and runner need the litert extra: "
                "pip install 'lrformer-edge[litert]'")
# The runner needs only the interpreter; converting and quantizing need the other two.
pytest.importorskip("ai_edge_litert", reason=EXTRA_NEEDED)

from lrformer_edge.artifacts.runner import RunnerInputError, RunnerStateError  # noqa: E402
from lrformer_edge.backends import backend_for, load_runner  # noqa: E402
from lrformer_edge.backends.litert import convert  # noqa: E402
from lrformer_edge.backends.litert.export import export_litert  # noqa: E402
from lrformer_edge.backends.litert.format import read_tflite_metadata  # noqa: E402
from lrformer_edge.backends.litert.runner import LiteRTRunner  # noqa: E402
from lrformer_edge.models.factory import create_model  # noqa: E402
from lrformer_edge.validation.harness import describe_artifact  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 64)
VARIANT = "lrformer-test"
PACKAGES = ("litert-torch", "ai-edge-quantizer", "ai-edge-litert")


def _quiet(*_):
    pass


def _needs_exporter():
    for module in ("litert_torch", "ai_edge_quantizer"):
        pytest.importorskip(module, reason=EXTRA_NEEDED)


class Export(NamedTuple):
    result: object  # ExportResult
    logged: list[str]
    converted: bytes  # what litert-torch made, before quantization and metadata


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny model with fixed weights, as a checkpoint: the export and the gate's ground
    truth are then the same model."""
    from safetensors.torch import save_file

    from lrformer_edge.models.reference_weights import manifest_of, reference_state_dict

    state = reference_state_dict(manifest_of(create_model(VARIANT)))
    path = tmp_path_factory.mktemp("litert-model") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"variant": VARIANT})
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return create_model(VARIANT, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def fp32(model, tmp_path_factory) -> Export:
    """The FP32 export, and the flatbuffer litert-torch made for it (recorded on its way)."""
    _needs_exporter()
    converted: list[bytes] = []
    convert_float = convert.convert_float

    def recorded(deployed, input_size):
        converted.append(convert_float(deployed, input_size))
        return converted[-1]

    logged: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convert, "convert_float", recorded)
        result = export_litert(model, tmp_path_factory.mktemp("litert") / "tiny.tflite", SIZE,
                               threads=1, log=logged.append)
    return Export(result, logged, converted[0])


def _export_from(fp32: Export, model, output: Path, precision: str,
                 calibration=None, **options) -> Export:
    """``export_litert`` at ``precision`` without a second conversion: litert-torch's step
    answers with the FP32 export's conversion of the same model at the same size."""
    def converted(deployed, input_size):
        assert tuple(input_size) == SIZE
        return fp32.converted

    logged: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convert, "convert_float", converted)
        result = export_litert(model, output, SIZE, precision, calibration=calibration,
                               threads=1, log=logged.append, **options)
    return Export(result, logged, fp32.converted)


@pytest.fixture(scope="module")
def calibration(model):
    from lrformer_edge.data.calibration import build_calibration_set

    return build_calibration_set("procedural", model.config.data, SIZE, 4, seed=0)


@pytest.fixture(scope="module")
def fp16(fp32, model, tmp_path_factory) -> Export:
    return _export_from(fp32, model, tmp_path_factory.mktemp("litert-fp16") / "tiny-fp16.tflite",
                        "fp16")


@pytest.fixture(scope="module")
def int8(fp32, model, calibration, tmp_path_factory) -> Export:
    return _export_from(fp32, model, tmp_path_factory.mktemp("litert-int8") / "tiny-int8.tflite",
                        "int8", calibration)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """A valid .tflite of another network: a small convolution, converted without our
    metadata (3 s here)."""
    _needs_exporter()
    import litert_torch
    import torch

    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    model = litert_torch.convert(network, (torch.zeros(1, 3, 8, 8),))
    path = tmp_path_factory.mktemp("foreign") / "other-network.tflite"
    path.write_bytes(bytes(model.model_content()))
    return path


def _graph_facts(model: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """(tensor type name -> count, operator name -> count) of the model's main graph,
    QUANTIZE/DEQUANTIZE included (``convert.operator_counts`` leaves them out)."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    graph = root.Subgraphs(0)
    types = {value: name for name, value in vars(schema.TensorType).items()
             if not name.startswith("_")}
    operators = {value: name for name, value in vars(schema.BuiltinOperator).items()
                 if not name.startswith("_")}
    tensor_types: dict[str, int] = {}
    for index in range(graph.TensorsLength()):
        name = types[graph.Tensors(index).Type()]
        tensor_types[name] = tensor_types.get(name, 0) + 1
    op_names: dict[str, int] = {}
    for index in range(graph.OperatorsLength()):
        code = root.OperatorCodes(graph.Operators(index).OpcodeIndex())
        name = operators[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        op_names[name] = op_names.get(name, 0) + 1
    return tensor_types, op_names


def _logits(path: Path, feed: np.ndarray) -> np.ndarray:
    with LiteRTRunner(path, threads=1) as runner:
        return runner.infer(feed)["logits"]


# ----------------------------------------------------------------------------- export
@pytest.mark.slow
def test_fp32_model_matches_pytorch_and_reports_its_export(fp32):
    result, logged = fp32.result, fp32.logged
    assert result.path.suffix == ".tflite" and result.path.is_file()
    assert result.parity.max_abs < 1e-4 and result.parity.pixel_agreement == 1.0
    assert not [p for p in result.path.parent.iterdir() if p != result.path]  # no temp files
    stages = result.metadata["export_stage_seconds"]
    assert set(stages) == {"convert"} and stages["convert"] > 0
    assert any(line.startswith("export stages: convert ") for line in logged)
    # FP32: every operator computes in float, and the counts are the model's.
    assert result.metadata["int8_ops"] == {}
    assert result.metadata["float_ops"] == result.op_counts
    assert {"CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX"} <= set(result.op_counts)


@pytest.mark.slow
def test_metadata_round_trip(fp32, model):
    result = fp32.result
    metadata = read_tflite_metadata(result.path)
    assert metadata == result.metadata
    data = model.config.data
    assert metadata["variant"] == VARIANT and metadata["precision"] == "fp32"
    assert metadata["class_names"] == list(data.class_names)
    assert metadata["palette"] == [list(c) for c in data.palette]
    assert metadata["mean"] == list(data.mean) and metadata["std"] == list(data.std)
    assert metadata["input_size"] == list(SIZE)
    assert metadata["checkpoint_sha256"] == model.checkpoint_sha256
    assert metadata["format"] == "litert-tflite"
    for package in PACKAGES:
        key = package.replace("-", "_") + "_version"
        assert metadata[key] == importlib.metadata.version(package)
    assert "calibration_set" not in metadata and "quantization_recipe" not in metadata


@pytest.mark.slow
def test_int8_model_computes_convolutions_and_linears_in_int8(int8, fp32, calibration):
    result, logged = int8.result, int8.logged
    model = result.path.read_bytes()
    int8_ops, float_ops = convert.operator_counts(model)
    # Every convolution (dense, depthwise) and linear of the FP32 model, and only those, compute
    # in int8.
    assert set(convert.INT8_OPERATIONS) == {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
    assert dict(int8_ops) == {op: fp32.result.op_counts[op] for op in convert.INT8_OPERATIONS}
    # What stays float: LayerNorm (as reductions), softmax, GELU, attention, resize.
    assert {"MEAN", "SOFTMAX", "GELU", "BATCH_MATMUL", "RESIZE_BILINEAR"} <= set(float_ops)
    assert not set(float_ops) & set(convert.INT8_OPERATIONS)
    metadata = read_tflite_metadata(result.path)
    assert metadata == result.metadata and metadata["precision"] == "int8"
    assert metadata["int8_ops"] == dict(int8_ops) and metadata["float_ops"] == dict(float_ops)
    assert metadata["calibration_set"] == calibration.describe()
    assert metadata["quantization_recipe"] == convert.quantization_recipe("int8")
    assert set(metadata["export_stage_seconds"]) == {"convert", "quantize"}
    assert f"int8 operators: {sum(int8_ops.values())} (" in "\n".join(logged)
    stays_float = [line for line in logged if line.startswith("operators that stay float: ")]
    assert len(stays_float) == 1
    assert all(f"{op} x{count}" in stays_float[0] for op, count in float_ops.items())
    # Float in and out, so the pipeline is unchanged: the int8 graph quantizes inside.
    tensor_types, operators = _graph_facts(model)
    assert tensor_types["INT8"] > 0 and operators["QUANTIZE"] > 0
    runner = LiteRTRunner(result.path, threads=1)
    assert [(s.dtype, s.shape) for s in runner.input_specs] == [("float32", (1, 3, *SIZE))]
    with runner:
        logits = runner.infer(calibration.batches[1])["logits"]
    assert logits.dtype == np.float32 and logits.shape == (1, 150, *SIZE)
    # INT8 parity (checked by the export, on a calibration image): the untrained tiny model's
    # near-tie logits flip some labels.
    assert result.parity.cosine >= 0.995 and result.parity.pixel_agreement >= 0.9
    assert describe_artifact(result.path).precision == "int8"


@pytest.mark.slow
def test_fp16_model_stores_float16_weights_and_agrees_with_fp32(fp16, fp32, calibration):
    result = fp16.result
    tensor_types, operators = _graph_facts(result.path.read_bytes())
    # The weights are float16 constants, expanded to float by DEQUANTIZE; compute stays float.
    assert tensor_types["FLOAT16"] > 0 and operators["DEQUANTIZE"] == tensor_types["FLOAT16"]
    assert result.metadata["int8_ops"] == {}
    assert result.metadata["float_ops"] == fp32.result.metadata["float_ops"]
    assert result.path.stat().st_size < 0.8 * fp32.result.path.stat().st_size
    metadata = read_tflite_metadata(result.path)
    assert metadata == result.metadata and metadata["precision"] == "fp16"
    assert metadata["quantization_recipe"] == convert.quantization_recipe("fp16")
    assert "calibration_set" not in metadata
    for feed in calibration.batches[:2]:
        half, full = _logits(result.path, feed), _logits(fp32.result.path, feed)
        assert np.abs(half - full).max() < 0.02
        assert (half.argmax(1) == full.argmax(1)).mean() >= 0.99
    assert describe_artifact(result.path).precision == "fp16"


@pytest.mark.slow
def test_quantize_takes_the_exported_file_as_it_is(fp32, calibration):
    """``convert.quantize`` accepts an exported .tflite, our metadata buffer included."""
    model = convert.quantize(fp32.result.path.read_bytes(), "int8", calibration.batches[:2], 1)
    int8_ops, _ = convert.operator_counts(model)
    assert set(int8_ops) == set(convert.INT8_OPERATIONS)


def test_export_refuses_bad_requests_before_converting(model, tmp_path):
    _needs_exporter()
    from lrformer_edge.data.calibration import CalibrationSet, build_calibration_set

    with pytest.raises(ValueError, match=r"\.tflite file; got output .*model\.onnx "
                                         r"\(name it e\.g\. model\.tflite\)"):
        export_litert(model, tmp_path / "model.onnx", SIZE)
    with pytest.raises(ValueError, match="precision must be one of"):
        export_litert(model, tmp_path / "m.tflite", SIZE, "bf16")
    with pytest.raises(ValueError, match="int8 needs a calibration set"):
        export_litert(model, tmp_path / "m.tflite", SIZE, "int8")
    calibration = build_calibration_set("procedural", model.config.data, (96, 64), 1)
    with pytest.raises(ValueError, match="applies to int8 only"):
        export_litert(model, tmp_path / "m.tflite", SIZE, "fp16", calibration=calibration)
    with pytest.raises(ValueError, match="calibration set is 96x64, the export is at 64x64"):
        export_litert(model, tmp_path / "m.tflite", SIZE, "int8", calibration=calibration)
    with pytest.raises(ValueError, match="calibration set from empty-folder holds no images"):
        export_litert(model, tmp_path / "m.tflite", SIZE, "int8",
                      calibration=CalibrationSet([], "empty-folder", 0))
    with pytest.raises(ValueError, match="multiples of 32"):
        export_litert(model, tmp_path / "m.tflite", (65, 64))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- runner
@pytest.mark.slow
def test_runner_uses_the_thread_count_asked_for_and_reports_it(fp32):
    result = fp32.result
    feed = np.zeros((1, 3, *SIZE), np.float32)
    outputs = {}
    for threads in (1, 2):
        runner = LiteRTRunner(result.path, threads=threads)
        with pytest.raises(RunnerStateError, match=r"use it as `with runner: runner.infer"):
            runner.infer(feed)
        with runner:
            outputs[threads] = runner.infer(feed)["logits"]
        assert runner.settings["threads"] == threads
    assert outputs[1].shape == (1, 150, *SIZE) and np.isfinite(outputs[1]).all()
    np.testing.assert_allclose(outputs[2], outputs[1], atol=1e-4)
    settings = LiteRTRunner(result.path).settings  # LiteRT's own default
    assert settings["threads"] == "default"
    assert settings["precision"] == "fp32" and settings["cpu_isa"]
    assert settings["float_ops"] == result.metadata["float_ops"]
    assert settings["ai_edge_litert"] == importlib.metadata.version("ai-edge-litert")
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        LiteRTRunner(result.path, threads=0)


@pytest.mark.slow
def test_a_wrong_input_says_what_was_expected(fp32):
    result = fp32.result
    with LiteRTRunner(result.path) as runner:
        with pytest.raises(RunnerInputError, match=r"has shape \(1, 3, 96, 64\), expected "
                                                   r"input: float32\[1, 3, 64, 64\]"):
            runner.infer(np.zeros((1, 3, 96, 64), np.float32))
        with pytest.raises(RunnerInputError, match="has dtype float64, expected float32"):
            runner.infer(np.zeros((1, 3, *SIZE)))
        assert runner.infer(np.zeros((1, 3, *SIZE), np.float32))["logits"].shape[2:] == SIZE


def test_a_file_that_is_no_tflite_is_refused(tmp_path):
    not_a_model = tmp_path / "notes.tflite"
    not_a_model.write_text("these are not the weights you are looking for")
    empty = tmp_path / "empty.tflite"
    empty.touch()
    for path in (not_a_model, empty):
        message = (f"{path.name} is not a LiteRT model \\(it does not carry the TFLite file "
                   f"identifier TFL3\\); export it with export_scripts/to_litert.py")
        for open_it in (LiteRTRunner, load_runner, describe_artifact):
            with pytest.raises(ValueError, match=message):
                open_it(path)
    missing = tmp_path / "missing.tflite"
    for open_it in (LiteRTRunner, describe_artifact):
        with pytest.raises(ValueError, match=r"expected a LiteRT model \(\.tflite file\), got "
                                             r".*missing\.tflite \(it does not exist\)"):
            open_it(missing)
    with pytest.raises(FileNotFoundError, match="missing.tflite does not exist"):
        load_runner(missing)


@pytest.mark.slow
def test_a_truncated_tflite_is_refused_with_the_reason(fp32, tmp_path):
    data = fp32.result.path.read_bytes()
    truncated = tmp_path / "truncated.tflite"
    message = ("truncated.tflite is damaged: its flatbuffer tables cannot be read .*"
               "export it with export_scripts/to_litert.py")
    for tenths in range(1, 10):
        truncated.write_bytes(data[:len(data) * tenths // 10])
        with pytest.raises(ValueError, match=message):
            LiteRTRunner(truncated)
    truncated.write_bytes(data[:len(data) // 2])
    for open_it in (load_runner, describe_artifact):
        with pytest.raises(ValueError, match=message):
            open_it(truncated)
    # Cut within its last bytes, the tables still parse; LiteRT refuses it when it loads.
    truncated.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="LiteRT cannot load truncated.tflite .*the file is "
                                         "damaged"):
        with LiteRTRunner(truncated):
            pass


def test_a_tflite_of_another_network_is_refused(foreign):
    message = (r"other-network.tflite is not an LRFormer Edge LiteRT model: it has no "
               r"lrformer_metadata metadata .*export it with export_scripts/to_litert.py")
    for open_it in (LiteRTRunner, load_runner, describe_artifact):
        with pytest.raises(ValueError, match=message):
            open_it(foreign)


# ----------------------------------------------------------------------------- registry, gate
@pytest.mark.slow
def test_the_registry_reaches_the_model(fp32):
    result = fp32.result
    backend = backend_for(result.path)
    assert backend.name == "litert" and backend.unavailable_reason() is None
    with load_runner(result.path, variant=VARIANT, threads=1) as runner:
        assert isinstance(runner, LiteRTRunner) and runner.settings["threads"] == 1
    description = describe_artifact(result.path)
    assert (description.backend, description.precision) == ("litert", "fp32")
    assert description.metadata["variant"] == VARIANT
    with pytest.raises(ValueError, match=f"records variant {VARIANT}"):
        load_runner(result.path, variant="lrformer-t")


@pytest.mark.slow
def test_the_gate_passes_the_fp32_model(fp32, checkpoint, tmp_path):
    from lrformer_edge.validation import ValidationConfig, run_validation

    result = fp32.result
    outcome = run_validation(ValidationConfig([result.path], tmp_path / "report", images=3,
                                              variant=VARIANT, reference_checkpoint=checkpoint,
                                              log=_quiet))
    assert outcome.violations == []
    row = outcome.run.results[1]
    assert (row.backend, row.precision, row.status) == ("litert", "fp32", "ok")
    assert row.pixel_agreement > 0.9999 and row.logits_max_abs < 1e-3
    assert row.settings["float_ops"] == result.metadata["float_ops"]
    assert (tmp_path / "report" / "report.json").is_file()


@pytest.mark.slow
def test_validate_runs_the_model_against_pytorch(fp32, model):
    """What ``to_litert.py --validate N`` runs after the export."""
    from lrformer_edge.export_flow import validate_artifact

    logged: list[str] = []
    result = validate_artifact(model, fp32.result.path, 2, log=logged.append)
    assert result["images"] == 2 and result["pixel_agreement"] > 0.9999
    assert abs(result["mIoU_delta_points"]) < 0.02
    assert logged and logged[0].startswith("LiteRT model tiny.tflite on 2 procedural")


def test_a_missing_package_names_the_extra(monkeypatch, model, tmp_path):
    from lrformer_edge.artifacts.optional import MissingDependencyError
    from lrformer_edge.backends.litert.describe import EXPORT_PACKAGES, litert_unavailable_reason
    from lrformer_edge.backends.litert.format import litert_module

    extra = r"pip install 'lrformer-edge\[litert\]'"
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # as if absent
    with pytest.raises(MissingDependencyError, match=f"needs the Python package 'ai_edge_litert'"
                                                     f".*{extra}"):
        litert_module("ai_edge_litert.interpreter", "the LiteRT runner")
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    assert backend_for(tmp_path / "m.tflite").unavailable_reason() is None  # runs without it
    reason = litert_unavailable_reason(EXPORT_PACKAGES)
    assert reason.startswith("the Python package 'litert_torch' is not installed")
    assert reason.endswith("run: pip install 'lrformer-edge[litert]'")
    with pytest.raises(MissingDependencyError, match=f"LiteRT export needs .*{extra}"):
        export_litert(model, tmp_path / "m.tflite", SIZE)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- benchmark
def test_benchmark_rows_are_not_in_the_default_table(tmp_path):
    from lrformer_edge.backends.base import BenchmarkContext
    from lrformer_edge.backends.litert import benchmark

    def no_calibration():
        raise AssertionError("the default table builds no LiteRT model")

    context = BenchmarkContext(None, SIZE, tmp_path, no_calibration, None, False, ("portable",),
                               open_runner=load_runner, log=_quiet)
    assert benchmark.candidates(context) == [] and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_benchmark_rows_run_both_models(fp32, int8, calibration, tmp_path, monkeypatch):
    """Both rows come with --all (LiteRT targets phones and ARM boards, not this host); INT8 is
    calibrated on the benchmark's set and both run with the benchmark's threads."""
    from lrformer_edge.backends.base import BenchmarkContext
    from lrformer_edge.backends.litert import benchmark, export

    made = {"fp32": fp32.result, "int8": int8.result}
    asked = []

    def exported(model, output, input_size, precision, calibration=None, threads=None, log=None):
        asked.append((precision, calibration, threads))
        return made[precision]

    monkeypatch.setattr(export, "export_litert", exported)
    context = BenchmarkContext(None, SIZE, tmp_path, lambda: calibration, 1, True,
                               ("portable",), open_runner=load_runner, log=_quiet)
    rows = benchmark.candidates(context)
    assert [(row.backend, row.precision) for row in rows] == [("litert", "fp32"),
                                                                ("litert", "int8")]
    assert asked == [("fp32", None, 1), ("int8", calibration, 1)]
    for row in rows:
        with row.make_runner() as runner:
            assert runner.settings["threads"] == 1
            assert runner.metadata["precision"] == row.precision


# ----------------------------------------------------------------------------- command line
def _cli(*args, cwd: Path, timeout: int = 300):
    return subprocess.run([sys.executable, str(REPO / "export_scripts" / "to_litert.py"),
                           "--variant", VARIANT, "--input-size", "64", "64", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _one_error_line(done) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, done.stderr
    return errors[0]


@pytest.mark.parametrize("args, message", [
    (["--output", "model.onnx"], "a LiteRT model is a .tflite file; got output model.onnx"),
    (["--calib-data", "procedural", "--output", "m.tflite"],
     "--calib-data applies to --precision int8 only"),
    (["--threads", "0", "--output", "m.tflite"], "--threads must be positive, got 0"),
    (["--precision", "int8", "--calib-data", "nowhere", "--output", "m.tflite"],
     "nowhere does not exist"),
])
def test_cli_refuses_bad_input_in_one_line(args, message, tmp_path):
    assert message in _one_error_line(_cli(*args, cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_empty_calibration_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _cli("--precision", "int8", "--calib-data", "empty", "--output", "m.tflite",
                cwd=tmp_path)
    assert "no images found under empty" in _one_error_line(done)
    assert list(tmp_path.iterdir()) == [empty] and list(empty.iterdir()) == []


@pytest.mark.slow
def test_cli_exports_a_calibrated_int8_model(checkpoint, model, tmp_path):
    """The whole command once: conversion, calibration on 2 procedural scenes, quantization,
    the parity check, and --validate."""
    _needs_exporter()
    from lrformer_edge.data.calibration import build_calibration_set

    done = _cli("--checkpoint", str(checkpoint), "--precision", "int8", "--calib-images", "2",
                "--threads", "1", "--validate", "2", "--output", "m.tflite", cwd=tmp_path,
                timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("int8 operators: ") for line in lines)
    assert any(line.startswith("operators that stay float: ") for line in lines)
    assert any(line.startswith("wrote m.tflite") for line in lines)
    assert any(line.startswith("LiteRT model m.tflite on 2 procedural") for line in lines)
    assert list(tmp_path.iterdir()) == [tmp_path / "m.tflite"]
    metadata = read_tflite_metadata(tmp_path / "m.tflite")
    assert metadata["precision"] == "int8" and metadata["variant"] == VARIANT
    assert metadata["checkpoint_sha256"] == model.checkpoint_sha256
    expected = build_calibration_set("procedural", model.config.data, SIZE, 2, seed=0)
    assert metadata["calibration_set"] == expected.describe()
    assert metadata["quantization_recipe"] == convert.quantization_recipe("int8")
    assert set(metadata["export_stage_seconds"]) == {"convert", "quantize"}
    assert set(metadata["int8_ops"]) == set(convert.INT8_OPERATIONS)


# ----------------------------------------------------------------------------- precision config
# A dense convolution, a linear whose input LayerNorm the converter folds into its weight, and a
# depthwise convolution shared by the blocks of its stage: all int8 in the plain INT8 model.
FLOAT_LAYERS = ("backbone.block1.0.mlp.fc1", "backbone.block2.0.attn.kv.0",
                "backbone.d_convs3.1")
_KIND_OPERATION = {"conv": "CONV_2D", "depthwise": "DEPTHWISE_CONV_2D",
                   "linear": "FULLY_CONNECTED"}


def _precision_config(model, overrides, **fields):
    from lrformer_edge.artifacts.precision_config import PrecisionConfig

    return PrecisionConfig("int8", overrides, **{"variant": VARIANT, "input_size": SIZE,
                                                 "checkpoint_sha256": model.checkpoint_sha256,
                                                 **fields})


@pytest.fixture(scope="module")
def deployed(model):
    from lrformer_edge.models.deploy import to_deploy

    return to_deploy(model, SIZE).eval()


@pytest.fixture(scope="module")
def mixed(fp32, model, calibration, tmp_path_factory) -> Export:
    """The INT8 export that keeps FLOAT_LAYERS float (from the FP32 export's conversion)."""
    return _export_from(fp32, model, tmp_path_factory.mktemp("litert-mixed") / "mixed.tflite",
                        "int8", calibration, precision_config=_mixed_config(model))


def _mixed_config(model):
    return _precision_config(model, {layer: "float" for layer in FLOAT_LAYERS})


@pytest.mark.slow
def test_every_layer_is_found_by_its_weight(fp32, deployed):
    """Each layer of the tiny model is one operator of its kind in the converted model (its
    d_convs are called by one block), and no operator belongs to two layers."""
    from lrformer_edge.backends.litert.layer_ops import layer_ops, weighted_ops
    from lrformer_edge.models.layers import quantizable_layers

    layers = quantizable_layers(deployed)
    found = layer_ops(fp32.converted, deployed, [layer.name for layer in layers])
    for layer in layers:
        assert [op.operation for op in found[layer.name]] == [_KIND_OPERATION[layer.kind]]
    indices = [op.index for ops in found.values() for op in ops]
    assert sorted(indices) == sorted({op.index for op in weighted_ops(fp32.converted)})


@pytest.mark.slow
def test_the_recipe_keeps_exactly_the_float_layers_ops(fp32, deployed):
    """Every emitted regex selects its operator and no other, as ai-edge-quantizer's own
    recipe manager reads the recipe."""
    from ai_edge_quantizer import recipe_manager

    from lrformer_edge.backends.litert.layer_ops import (
        NO_QUANTIZE,
        check_recipe_keeps_float,
        float_ops_of,
        weighted_ops,
    )

    float_ops = [op for ops in float_ops_of(fp32.converted, deployed, FLOAT_LAYERS).values()
                 for op in ops]
    assert len(float_ops) == len(FLOAT_LAYERS)
    recipe = convert.quantization_recipe("int8", float_ops)
    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe)
    for op in weighted_ops(fp32.converted):
        algorithm, _ = manager.get_quantization_configs(op.operation, op.scope)
        assert (algorithm == NO_QUANTIZE) == (op in float_ops), op.scope
    for op in float_ops:
        assert [other.index for other in weighted_ops(fp32.converted)
                if re.search(op.regex, other.scope)] == [op.index]
    check_recipe_keeps_float(fp32.converted, recipe, float_ops)
    with pytest.raises(RuntimeError, match="keeps operators .* float, the precision config "
                                           "asked for"):
        check_recipe_keeps_float(fp32.converted, recipe, float_ops[:1])


@pytest.mark.slow
def test_a_layer_no_operator_holds_is_an_error(fp32):
    """Another model's weights (same variant, untrained) are nowhere in the converted model."""
    from lrformer_edge.backends.layer_names import LayerMappingError
    from lrformer_edge.backends.litert.layer_ops import layer_ops
    from lrformer_edge.models.deploy import to_deploy

    other = to_deploy(create_model(VARIANT), SIZE).eval()
    with pytest.raises(LayerMappingError, match="no operator of the LiteRT model holds the "
                                                "weight of decode_head.conv_seg"):
        layer_ops(fp32.converted, other, ["decode_head.conv_seg"])
    with pytest.raises(LayerMappingError, match="has no layer decode_head.conv_sag"):
        layer_ops(fp32.converted, other, ["decode_head.conv_sag"])


@pytest.mark.slow
def test_int8_with_a_precision_config_keeps_its_layers_float(mixed, int8, model):
    result = mixed.result
    int8_ops, float_ops = convert.operator_counts(result.path.read_bytes())
    plain_int8 = int8.result.metadata["int8_ops"]
    # One operator per float layer left float, of its kind; every other one still int8.
    assert dict(int8_ops) == {**plain_int8, "CONV_2D": plain_int8["CONV_2D"] - 1,
                              "FULLY_CONNECTED": plain_int8["FULLY_CONNECTED"] - 1,
                              "DEPTHWISE_CONV_2D": plain_int8["DEPTHWISE_CONV_2D"] - 1}
    assert {op: float_ops[op] for op in convert.INT8_OPERATIONS} == \
        {"CONV_2D": 1, "FULLY_CONNECTED": 1, "DEPTHWISE_CONV_2D": 1}
    metadata = read_tflite_metadata(result.path)
    assert metadata == result.metadata and metadata["precision"] == "int8"
    assert metadata["precision_config"] == _mixed_config(model).metadata()
    kept = [entry for entry in metadata["quantization_recipe"]
            if entry["algorithm_key"] == "no_quantize"]
    assert len(kept) == len(FLOAT_LAYERS)
    assert metadata["quantization_recipe"][:len(convert.INT8_OPERATIONS)] == \
        convert.quantization_recipe("int8")
    assert result.parity.cosine >= 0.995 and result.parity.pixel_agreement >= 0.9


def test_export_refuses_a_precision_config_it_cannot_apply(model, tmp_path):
    _needs_exporter()
    from lrformer_edge.artifacts.precision_config import PrecisionConfig
    from lrformer_edge.data.calibration import build_calibration_set

    config = _precision_config(model, {FLOAT_LAYERS[0]: "float"})
    with pytest.raises(ValueError, match="a precision config applies to LiteRT INT8 only; this "
                                         "export is fp16"):
        export_litert(model, tmp_path / "m.tflite", SIZE, "fp16", precision_config=config)
    calibration = build_calibration_set("procedural", model.config.data, SIZE, 1)
    for wrong, message in [
        (PrecisionConfig("weights-int4", {FLOAT_LAYERS[0]: "float"}),
         "LiteRT INT8 applies precision configs of scheme int8 .* this one uses weights-int4"),
        (_precision_config(model, {FLOAT_LAYERS[0]: "float"}, variant="lrformer-t"),
         "measured on another model: variant lrformer-t \\(exporting lrformer-test\\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            export_litert(model, tmp_path / "m.tflite", SIZE, "int8", calibration=calibration,
                          precision_config=wrong)
    assert list(tmp_path.iterdir()) == []
    backend = backend_for(tmp_path / "m.tflite")
    assert backend.precision_schemes == ("int8",) and backend.export_mixed is not None


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp16", "--precision-config", "config.json", "--output", "m.tflite"],
     "--precision-config applies to --precision int8 only"),
    (["--precision", "int8", "--precision-config", "missing.json", "--output", "m.tflite"],
     "precision config missing.json does not exist"),
])
def test_cli_refuses_a_bad_precision_config_in_one_line(args, message, tmp_path):
    assert message in _one_error_line(_cli(*args, cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []
