"""ExecuTorch (XNNPACK) programs: export with parity and metadata, the runner (threads, input
checks), the errors for damaged and foreign .pte files, the registry and the gate reaching it.

One FP32 export (tiny variant, 64x64) serves most tests; the one INT8 export, with a precision
config that keeps two layers float, has its own fixture.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("executorch", reason="ExecuTorch export and runner need the executorch "
                                         "extra: pip install 'lrformer-edge[executorch]'")

from lrformer_edge.artifacts.runner import RunnerInputError  # noqa: E402
from lrformer_edge.backends import backend_for, load_runner  # noqa: E402
from lrformer_edge.backends.executorch.export import export_executorch  # noqa: E402
from lrformer_edge.backends.executorch.format import (  # noqa: E402
    METADATA_METHOD,
    delegation_summary,
    encode_metadata,
    fill_metadata,
    metadata_methods,
    read_pte_metadata,
    reserve_metadata,
)
from lrformer_edge.backends.executorch.runner import (  # noqa: E402
    ExecuTorchRunner,
    default_threads,
    threads_in_use,
    use_threads,
)
from lrformer_edge.models.factory import create_model  # noqa: E402
from lrformer_edge.validation.harness import describe_artifact  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 64)
VARIANT = "lrformer-test"


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny model with fixed weights, as a checkpoint: the export and the gate's ground
    truth are then the same model."""
    from safetensors.torch import save_file

    from lrformer_edge.models.reference_weights import manifest_of, reference_state_dict

    state = reference_state_dict(manifest_of(create_model(VARIANT)))
    path = tmp_path_factory.mktemp("executorch-model") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"variant": VARIANT})
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return create_model(VARIANT, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def fp32(model, tmp_path_factory):
    """(ExportResult, the lines the export logged)."""
    logged: list[str] = []
    result = export_executorch(model, tmp_path_factory.mktemp("executorch") / "tiny.pte", SIZE,
                               threads=1, log=logged.append)
    return result, logged


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """A valid .pte of another network: a small convolution, lowered without our metadata."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    program = torch.export.export(network, (torch.zeros(1, 3, 8, 8),))
    buffer = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]) \
        .to_executorch().buffer
    path = tmp_path_factory.mktemp("foreign") / "other-network.pte"
    path.write_bytes(buffer)
    return path


# ----------------------------------------------------------------------------- export
@pytest.mark.slow
def test_fp32_program_matches_pytorch_and_reports_its_export(fp32):
    result, logged = fp32
    assert result.path.suffix == ".pte" and result.path.is_file()
    assert result.parity.max_abs < 1e-4 and result.parity.pixel_agreement == 1.0
    assert not [p for p in result.path.parent.iterdir() if p != result.path]  # no temp files
    stages = result.metadata["export_stage_seconds"]
    assert {"export", "lower", "serialize"} <= set(stages) and all(s >= 0 for s in
                                                                   stages.values())
    assert any(line.startswith("export stages: ") and "lower" in line for line in logged)
    assert any(line.startswith("operators: ") and "inside XNNPACK" in line for line in logged)


@pytest.mark.slow
def test_delegation_counts_name_the_operators(fp32):
    """The export counts the operators inside XNNPACK (and names those outside it), and the
    runner's settings carry that summary into the validation report."""
    result, _ = fp32
    inside, outside = result.metadata["xnnpack_ops"], result.metadata["portable_ops"]
    assert sum(inside.values()) > 0, "no operator counted inside XNNPACK"
    assert result.op_counts == {op: inside.get(op, 0) + outside.get(op, 0)
                                for op in sorted({*inside, *outside})}
    summary = delegation_summary(result.metadata)
    assert summary["ops_in_xnnpack"] == sum(inside.values())
    assert summary["outside_xnnpack"] == {op: n for op, n in outside.items()}
    # The shaped deploy form is one XNNPACK delegate: no operator and no time outside it.
    assert outside == {} and "aten.convolution" in inside and "aten.bmm" in inside
    profiled = result.metadata["delegation"]
    assert profiled["runs"] >= 1 and profiled["method_ms"] > 0
    assert summary["latency_share_in_xnnpack"] == profiled["xnnpack_share"] >= 0.9


@pytest.mark.slow
def test_metadata_round_trip(fp32, model):
    result, _ = fp32
    metadata = read_pte_metadata(result.path)
    assert metadata == result.metadata
    data = model.config.data
    assert metadata["variant"] == VARIANT and metadata["precision"] == "fp32"
    assert metadata["class_names"] == list(data.class_names)
    assert metadata["palette"] == [list(c) for c in data.palette]
    assert metadata["mean"] == list(data.mean) and metadata["std"] == list(data.std)
    assert metadata["input_size"] == list(SIZE)
    assert metadata["checkpoint_sha256"] == model.checkpoint_sha256
    assert metadata["format"] == "executorch-pte" and metadata["delegate"] == "XNNPACK"
    import importlib.metadata

    assert metadata["executorch_version"] == importlib.metadata.version("executorch")
    assert "calibration_set" not in metadata and "quantization" not in metadata


def test_metadata_fills_the_room_reserved_before_lowering():
    known = {"lrformer_edge.variant": "x"}
    reserved = reserve_metadata(known)
    final = {**known, "lrformer_edge.export_stage_seconds": '{"lower": 1.5}'}
    program = b"head" + reserved + b"tail"
    filled = fill_metadata(program, reserved, final)
    assert len(filled) == len(program) and filled.startswith(b"head") and filled.endswith(b"tail")
    import json

    assert json.loads(filled[4:-4]) == final
    tensor = metadata_methods(reserved)[METADATA_METHOD]
    assert tensor.numpy().tobytes() == reserved
    with pytest.raises(RuntimeError, match="needs 17 bytes, 10 were reserved"):
        encode_metadata({"k": "v" * 8}, size=10)
    with pytest.raises(RuntimeError, match="occurs 2 times"):
        fill_metadata(reserved + reserved, reserved, final)


def test_export_refuses_bad_requests_before_lowering(model, tmp_path):
    from lrformer_edge.data.calibration import build_calibration_set

    with pytest.raises(ValueError, match=r"\.pte file; got output .*model\.onnx .*model\.pte"):
        export_executorch(model, tmp_path / "model.onnx", SIZE)
    with pytest.raises(ValueError, match="precision must be one of"):
        export_executorch(model, tmp_path / "m.pte", SIZE, "fp16")
    with pytest.raises(ValueError, match="int8 needs a calibration set"):
        export_executorch(model, tmp_path / "m.pte", SIZE, "int8")
    calibration = build_calibration_set("procedural", model.config.data, (96, 64), 1)
    with pytest.raises(ValueError, match="applies to int8 only"):
        export_executorch(model, tmp_path / "m.pte", SIZE, calibration=calibration)
    with pytest.raises(ValueError, match="calibration set is 96x64, the export is at 64x64"):
        export_executorch(model, tmp_path / "m.pte", SIZE, "int8", calibration=calibration)
    with pytest.raises(ValueError, match="multiples of 32"):
        export_executorch(model, tmp_path / "m.pte", (65, 64))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- runner
@pytest.mark.slow
def test_runner_uses_the_thread_count_asked_for_and_reports_it(fp32):
    result, _ = fp32
    feed = np.zeros((1, 3, *SIZE), np.float32)
    try:
        for threads in (1, 2):
            with ExecuTorchRunner(result.path, threads=threads) as runner:
                logits = runner.infer(feed)["logits"]
                settings = runner.settings
            assert threads_in_use() == threads
            assert settings["threads"] == threads and settings["requested_threads"] == threads
            assert logits.shape == (1, 150, *SIZE) and np.isfinite(logits).all()
        with ExecuTorchRunner(result.path) as runner:  # ExecuTorch's own default again
            assert runner.settings["threads"] == default_threads()
            assert runner.settings["requested_threads"] == "default"
    finally:
        use_threads(default_threads())  # the process-wide pool back to ExecuTorch's default
    assert settings["delegation"] == delegation_summary(result.metadata)
    assert settings["precision"] == "fp32" and settings["cpu_isa"]
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        ExecuTorchRunner(result.path, threads=0)


@pytest.mark.slow
def test_a_wrong_input_size_says_what_was_expected(fp32):
    result, _ = fp32
    with ExecuTorchRunner(result.path) as runner:
        with pytest.raises(RunnerInputError, match=r"has shape \(1, 3, 96, 64\), expected "
                                                   r"input: float32\[1, 3, 64, 64\]"):
            runner.infer(np.zeros((1, 3, 96, 64), np.float32))
        with pytest.raises(RunnerInputError, match="has dtype float64, expected float32"):
            runner.infer(np.zeros((1, 3, *SIZE)))


def test_a_damaged_pte_is_refused_with_the_reason(foreign, tmp_path):
    data = foreign.read_bytes()
    truncated = tmp_path / "truncated.pte"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"truncated.pte is truncated: its header says "
                                         f"{len(data)} bytes, the file has {len(data) // 2}"):
        ExecuTorchRunner(truncated)
    not_a_program = tmp_path / "notes.pte"
    not_a_program.write_text("these are not the weights you are looking for")
    for path in (not_a_program, tmp_path / "empty.pte"):
        path.touch()
        with pytest.raises(ValueError, match=f"{path.name} is not an ExecuTorch program"):
            load_runner(path)
    with pytest.raises(ValueError, match="is not a readable ExecuTorch program"):
        damaged = tmp_path / "damaged.pte"
        damaged.write_bytes(data[:40] + bytes(64) + data[104:])  # headers kept, program zeroed
        read_pte_metadata(damaged)


def test_a_pte_of_another_network_is_refused(foreign):
    message = (r"other-network.pte is not an LRFormer Edge ExecuTorch program: it has no "
               r"lrformer_metadata method .*export_scripts/to_executorch.py")
    with pytest.raises(ValueError, match=message):
        ExecuTorchRunner(foreign)
    with pytest.raises(ValueError, match=message):
        load_runner(foreign)
    with pytest.raises(ValueError, match=message):
        describe_artifact(foreign)


# ----------------------------------------------------------------------------- registry, gate
@pytest.mark.slow
def test_the_registry_reaches_the_program(fp32):
    result, _ = fp32
    backend = backend_for(result.path)
    assert backend.name == "executorch" and backend.unavailable_reason() is None
    with load_runner(result.path, variant=VARIANT, threads=1) as runner:
        assert isinstance(runner, ExecuTorchRunner) and runner.settings["threads"] == 1
    description = describe_artifact(result.path)
    assert (description.backend, description.precision) == ("executorch", "fp32")
    assert description.metadata["variant"] == VARIANT
    with pytest.raises(ValueError, match=f"records variant {VARIANT}"):
        load_runner(result.path, variant="lrformer-t")


@pytest.mark.slow
def test_the_gate_passes_the_fp32_program(fp32, checkpoint, tmp_path):
    from lrformer_edge.validation import ValidationConfig, run_validation

    result, _ = fp32
    outcome = run_validation(ValidationConfig([result.path], tmp_path / "report", images=3,
                                              variant=VARIANT, reference_checkpoint=checkpoint,
                                              log=_quiet))
    assert outcome.violations == []
    row = outcome.run.results[1]
    assert (row.backend, row.precision, row.status) == ("executorch", "fp32", "ok")
    assert row.pixel_agreement > 0.9999 and row.logits_max_abs < 1e-3
    assert row.settings["delegation"] == delegation_summary(result.metadata)
    assert (tmp_path / "report" / "report.json").is_file()


@pytest.mark.slow
def test_validate_runs_the_program_against_pytorch(fp32, model):
    """What ``to_executorch.py --validate N`` runs after the export."""
    from lrformer_edge.export_flow import validate_artifact

    logged: list[str] = []
    result = validate_artifact(model, fp32[0].path, 2, log=logged.append)
    assert result["images"] == 2 and result["pixel_agreement"] > 0.9999
    assert abs(result["mIoU_delta_points"]) < 0.02
    assert logged and logged[0].startswith("ExecuTorch program tiny.pte on 2 procedural")


def test_a_missing_executorch_names_the_extra(monkeypatch):
    from lrformer_edge.artifacts.optional import MissingDependencyError
    from lrformer_edge.backends.executorch.format import executorch_module

    monkeypatch.setitem(sys.modules, "executorch.runtime", None)  # import fails as if absent
    with pytest.raises(MissingDependencyError, match=r"pip install 'lrformer-edge\[executorch\]'"):
        executorch_module()


def test_benchmark_rows_are_not_in_the_default_table(tmp_path):
    from lrformer_edge.backends.base import BenchmarkContext
    from lrformer_edge.backends.executorch import benchmark

    def no_calibration():
        raise AssertionError("the default table builds no ExecuTorch program")

    context = BenchmarkContext(None, SIZE, tmp_path, no_calibration, None, False, ("portable",),
                               open_runner=load_runner, log=_quiet)
    assert benchmark.candidates(context) == [] and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- command line
def _cli(*args, cwd: Path):
    return subprocess.run([sys.executable, str(REPO / "export_scripts" / "to_executorch.py"),
                           "--variant", VARIANT, "--input-size", "64", "64", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--output", "model.onnx"], "ExecuTorch program is a .pte file; got output model.onnx"),
    (["--calib-data", "procedural", "--output", "m.pte"], "--calib-data applies to --int8 only"),
    (["--threads", "0", "--output", "m.pte"], "--threads must be positive"),
    (["--int8", "--calib-data", "nowhere", "--output", "m.pte"], "nowhere does not exist"),
    (["--precision-config", "config.json", "--output", "m.pte"],
     "--precision-config applies to --int8 only"),
    (["--int8", "--precision-config", "missing.json", "--output", "m.pte"],
     "precision config missing.json does not exist"),
])
def test_cli_refuses_bad_input_in_one_line(args, message, tmp_path):
    done = _cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- INT8
@pytest.fixture(scope="module")
def calibration(model):
    from lrformer_edge.data.calibration import build_calibration_set

    return build_calibration_set("procedural", model.config.data, SIZE, 4, seed=0)


# A dense convolution and a linear of different stages, int8 without a precision config.
FLOAT_LAYERS = ("backbone.block1.0.mlp.fc1", "backbone.block2.0.attn.proj")


def _precision_config(model, overrides, **fields):
    from lrformer_edge.artifacts.precision_config import PrecisionConfig

    return PrecisionConfig("int8", overrides, **{"variant": VARIANT, "input_size": SIZE,
                                                 "checkpoint_sha256": model.checkpoint_sha256,
                                                 **fields})


@pytest.fixture(scope="module")
def int8_export(model, calibration, tmp_path_factory):
    """(ExportResult, the converted PT2E graph, the precision config) of the one INT8 export
    of these tests (its lowering takes most of its 100 s here): the registry's ``export_mixed``
    with a precision config that keeps FLOAT_LAYERS float, which is ``export_executorch`` at
    int8 with every other layer as without one. The graph is recorded on its way from
    ``quantize_pt2e`` to the lowering."""
    from lrformer_edge.backends.executorch import lowering

    config = _precision_config(model, {layer: "float" for layer in FLOAT_LAYERS})
    converted = []
    quantize_pt2e = lowering.quantize_pt2e

    def recorded(*args, **kwargs):
        converted.append(quantize_pt2e(*args, **kwargs))
        return converted[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lowering, "quantize_pt2e", recorded)
        result = backend_for(Path("m.pte")).export_mixed(
            model, tmp_path_factory.mktemp("executorch-int8"), SIZE, config, calibration)
    return result, converted[0][0], config


@pytest.fixture(scope="module")
def int8(int8_export):
    return int8_export[0]


@pytest.mark.slow
def test_int8_program_records_its_calibration_and_quantization(int8, calibration):
    metadata = read_pte_metadata(int8.path)
    assert metadata["precision"] == "int8"
    assert metadata["calibration_set"] == calibration.describe()
    assert metadata["quantization"]  # the PT2E settings the lowering used
    # INT8 parity (checked by the export): cosine >= 0.995, agreement >= 90% on a calibration
    # image of the untrained tiny model, whose near-tie logits flip some labels.
    assert int8.parity.cosine >= 0.995 and int8.parity.pixel_agreement >= 0.9
    assert describe_artifact(int8.path).precision == "int8"


@pytest.mark.slow
def test_benchmark_rows_run_both_programs(fp32, int8, calibration, tmp_path, monkeypatch):
    """Both rows come with --all (ExecuTorch targets other devices than this host); INT8 is
    calibrated on the benchmark's set and both run with the benchmark's threads."""
    from lrformer_edge.backends.base import BenchmarkContext
    from lrformer_edge.backends.executorch import benchmark, export

    made = {"fp32": fp32[0], "int8": int8}
    asked = []

    def exported(model, output, input_size, precision, calibration=None, threads=None, log=None):
        asked.append((precision, calibration, threads))
        return made[precision]

    monkeypatch.setattr(export, "export_executorch", exported)
    context = BenchmarkContext(None, SIZE, tmp_path, lambda: calibration, 1, True,
                               ("portable",), open_runner=load_runner, log=_quiet)
    rows = benchmark.candidates(context)
    assert [(row.backend, row.precision) for row in rows] == [("executorch", "fp32"),
                                                                ("executorch", "int8")]
    assert asked == [("fp32", None, 1), ("int8", calibration, 1)]
    for row in rows:
        with row.make_runner() as runner:
            assert runner.settings["threads"] == 1
            assert runner.metadata["precision"] == row.precision


# ----------------------------------------------------------------------------- precision config
@pytest.mark.slow
def test_a_precision_config_keeps_its_layers_float(int8_export, model):
    from lrformer_edge.backends.executorch.lowering import int8_layers, layer_nodes
    from lrformer_edge.models.layers import quantizable_layers

    result, graph_module, config = int8_export
    assert result.path.name == "model.pte" and result.path.is_file()
    # PT2E quantizes the dense convolutions and linears (depthwise ones stay float): all of them
    # but the config's float layers have int8 weights in the converted graph, those none.
    dense = {layer.name for layer in quantizable_layers(model) if layer.kind != "depthwise"}
    quantized = set(int8_layers(graph_module.graph))
    assert quantized == dense - set(FLOAT_LAYERS)
    # No quantize/dequantize around the float layers: a float weight constant, a float input
    # (their producers are float ops), and a float output.
    nodes = layer_nodes(graph_module.graph)

    def quant_op(node) -> bool:
        return "quantize" in str(getattr(node, "target", ""))

    for layer in FLOAT_LAYERS:
        (node,) = nodes[layer]
        assert node.args[1].op == "get_attr" and not quant_op(node.args[0])
        assert not any(quant_op(user) for user in node.users)
    metadata = read_pte_metadata(result.path)
    assert metadata == result.metadata and metadata["precision"] == "int8"
    assert metadata["precision_config"] == config.metadata()
    assert metadata["quantization"]["int8_layers"] == len(dense) - len(FLOAT_LAYERS)
    assert result.parity.cosine >= 0.995 and result.parity.pixel_agreement >= 0.9


@pytest.mark.slow
def test_a_float_layer_no_node_comes_from_is_an_error(int8_export):
    from lrformer_edge.backends.executorch.lowering import quantized_node_filter

    graph = int8_export[1].graph
    with pytest.raises(ValueError, match=r"keeps 1 layer\(s\) in float that no convolution or "
                                         r"linear of the exported graph comes from: "
                                         r"backbone\.block1\.0\.mlp\.fc9"):
        quantized_node_filter(graph, [FLOAT_LAYERS[0], "backbone.block1.0.mlp.fc9"])
    assert quantized_node_filter(graph, FLOAT_LAYERS)  # every name found


def test_export_refuses_a_precision_config_it_cannot_apply(model, calibration, tmp_path):
    from lrformer_edge.artifacts.precision_config import PrecisionConfig

    config = _precision_config(model, {FLOAT_LAYERS[0]: "float"})
    with pytest.raises(ValueError, match="a precision config applies to ExecuTorch INT8 only; "
                                         "this export is fp32"):
        export_executorch(model, tmp_path / "m.pte", SIZE, precision_config=config)
    for wrong, message in [
        (PrecisionConfig("palette4", {FLOAT_LAYERS[0]: "float"}),
         "ExecuTorch INT8 applies precision configs of scheme int8 .* this one uses palette4"),
        (_precision_config(model, {FLOAT_LAYERS[0]: "float"}, input_size=(128, 128)),
         "measured on another model: input size 128x128 \\(exporting 64x64\\)"),
        (_precision_config(model, {"backbone.block1.0.mlp.fc9": "float"}),
         "does not have: 'backbone.block1.0.mlp.fc9' \\(did you mean"),
    ]:
        with pytest.raises(ValueError, match=message):
            export_executorch(model, tmp_path / "m.pte", SIZE, "int8", calibration=calibration,
                              precision_config=wrong)
    assert list(tmp_path.iterdir()) == []
    backend = backend_for(tmp_path / "m.pte")
    assert backend.precision_schemes == ("int8",) and backend.export_mixed is not None

