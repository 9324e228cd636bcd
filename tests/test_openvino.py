"""OpenVINO IR export (FP32/FP16) and the runner with explicit inference precision."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lrformer_edge
from lrformer_edge.artifacts.parity import ParityError, ParityThresholds
from lrformer_edge.backends import load_runner
from lrformer_edge.models.deploy import to_deploy
from lrformer_edge.models.reference_weights import manifest_of, reference_state_dict
from lrformer_edge.pipeline import SegmentationPipeline

pytest.importorskip("openvino", reason="needs the openvino extra: pip install 'lrformer-edge[openvino]'")

from lrformer_edge.backends.openvino.export import compile_check_line, export_openvino
from lrformer_edge.backends.openvino.runner import OpenVINORunner

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    model = lrformer_edge.create_model("lrformer-test")
    model.load_state_dict(reference_state_dict(manifest_of(model)))
    return model


@pytest.fixture(scope="module")
def fp32_ir(tiny, tmp_path_factory):
    return export_openvino(tiny, tmp_path_factory.mktemp("ov") / "fp32", (64, 96), "fp32")


def test_fp32_ir_matches_pytorch_and_records_metadata(fp32_ir):
    assert fp32_ir.parity.max_abs < 1e-4 and fp32_ir.parity.pixel_agreement == 1.0
    assert fp32_ir.path.with_suffix(".bin").is_file()
    with load_runner(fp32_ir.path.parent) as runner:  # the folder is enough
        assert isinstance(runner, OpenVINORunner)
        meta = runner.metadata
        assert meta["variant"] == "lrformer-test" and meta["weights_precision"] == "fp32"
        assert meta["input_size"] == [64, 96] and len(meta["class_names"]) == 150


@pytest.mark.parametrize("hint, expected", [("f32", "f32"), ("bf16", None)])
def test_precision_is_explicit_and_reported(fp32_ir, hint, expected):
    with OpenVINORunner(fp32_ir.path, precision=hint, threads=1) as runner:
        runner.infer({"input": np.zeros((1, 3, 64, 96), np.float32)})
        settings = runner.settings
    assert settings["requested_precision"] == hint and settings["threads"] == 1
    # bf16 runs natively only where the CPU has it; whatever was used is reported, never hidden.
    assert settings["inference_precision"] == (expected or settings["inference_precision"])
    assert settings["inference_precision"] in ("f32", "bf16", "f16")


def test_fp16_ir_keeps_decisions(tiny, tmp_path):
    result = export_openvino(tiny, tmp_path / "fp16", (64, 96), "fp16")
    assert result.parity.pixel_agreement > 0.995 and result.parity.cosine > 0.9999
    assert result.metadata["weights_precision"] == "fp16"


def test_failed_parity_leaves_no_folder(tiny, tmp_path):
    with pytest.raises(ParityError):
        export_openvino(tiny, tmp_path / "bad", (64, 64), parity=ParityThresholds(min_cosine=2))
    assert list(tmp_path.iterdir()) == []


def test_runner_rejects_unknown_settings(fp32_ir):
    with pytest.raises(ValueError, match="precision must be one of"):
        OpenVINORunner(fp32_ir.path, precision="int4")
    with pytest.raises(ValueError, match="mode must be one of"):
        OpenVINORunner(fp32_ir.path, mode="fast")


def test_pipeline_over_the_ir(fp32_ir, tiny, rgb_image):
    with SegmentationPipeline.from_artifact(fp32_ir.path) as pipeline:
        labels = pipeline(rgb_image)
    reference = SegmentationPipeline.from_model(tiny, input_size=(64, 96))(rgb_image)
    assert (labels == reference).mean() > 0.999


def test_to_openvino_cli(tmp_path):
    command = [sys.executable, str(REPO / "export_scripts" / "to_openvino.py"), "--variant",
               "lrformer-test", "--input-size", "64", "64", "--output", str(tmp_path / "ir")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert compile_check_line() in result.stdout  # every hint, or what runs as f32 here
    bad = subprocess.run(command[:-2] + ["--precision", "int4", "--output", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    missing = subprocess.run(command[:-2] + ["--precision", "int8", "--calib-data",
                                             str(tmp_path / "nowhere"), "--output", "y"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "nowhere does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    import cv2

    from lrformer_edge.data.procedural import generate_scene

    folder = tmp_path_factory.mktemp("frames")
    for seed in range(6):
        cv2.imwrite(str(folder / f"{seed}.jpg"), generate_scene(seed, 80, 120).image)
    return folder


@pytest.fixture(scope="module")
def folder_int8(tiny, frames, tmp_path_factory):
    """(calibration set from an image folder, the INT8 IR calibrated with it; its statistics
    are in the suite's default cache)."""
    from lrformer_edge.data.calibration import build_calibration_set

    calibration = build_calibration_set(frames, tiny.config.data, (64, 96), 4, seed=1)
    return calibration, export_openvino(tiny, tmp_path_factory.mktemp("int8") / "int8",
                                        (64, 96), "int8", calibration=calibration)


def test_int8_from_an_image_folder_records_its_calibration(tiny, frames, folder_int8, tmp_path):
    from lrformer_edge.data.calibration import build_calibration_set

    calibration, result = folder_int8
    again = build_calibration_set(frames, tiny.config.data, (64, 96), 4, seed=1)
    assert len(calibration.batches) == 4 and calibration.sha256 == again.sha256
    meta = result.metadata
    assert meta["weights_precision"] == "int8"
    assert meta["calibration_set"]["sha256"] == calibration.sha256
    assert meta["quantization"]["model_type"] == "TRANSFORMER"
    assert meta["quantization"]["smooth_quant"] is False
    # Portable by default: correct on every x86 CPU, with or without VNNI.
    assert meta["quantization"]["target_cpu_isa"] == "portable"
    assert meta["quantization"]["weight_bits"] == 7
    assert result.parity.cosine > 0.999 and result.parity.pixel_agreement > 0.9
    xml = result.path.read_text()
    assert "FakeQuantize" in xml or "FakeConvert" in xml  # really quantized
    _assert_pooling_stays_float(result.path, fp32_pools=len(_pooling_matmuls_of(tiny, tmp_path)))


def _pooling_matmuls_of(tiny, tmp_path):
    import openvino as ov

    from lrformer_edge.backends.openvino.ptq import pooling_matmuls

    fp32 = export_openvino(tiny, tmp_path / "fp32-pools", (64, 96), "fp32")
    return pooling_matmuls(ov.Core().read_model(str(fp32.path)))


def _assert_pooling_stays_float(xml_path, fp32_pools: int) -> None:
    """The exact-pooling MatMuls keep their constant averaging matrix and a float input: NNCF
    left them alone (an int8 MatMul with weights on the left does not compile on the CPU)."""
    import openvino as ov

    from lrformer_edge.backends.openvino.ptq import pooling_matmuls

    model = ov.Core().read_model(str(xml_path))
    names = set(pooling_matmuls(model))
    assert fp32_pools > 0 and len(names) == fp32_pools
    for op in model.get_ordered_ops():
        if op.get_friendly_name() in names:
            assert op.input_value(1).get_node().get_type_name() != "FakeQuantize"


# Float layers of the precision config tests: a linear layer and a shared depthwise convolution
# (one node per block that calls it), both with ONNX-derived names in every conversion.
FLOAT_LAYERS = ("backbone.block2.0.attn.kv.0", "backbone.d_convs1.0")
SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze")
DEQUANTIZE_OPS = ("Convert", "Multiply", "Subtract")


def _producer(value, through):
    node = value.get_node()
    while node.get_type_name() in through:
        node = node.input_value(0).get_node()
    return node


def _weighted_ops(xml_path) -> dict[str, tuple[bool, bool]]:
    """{convolution or MatMul with a constant weight: (a FakeQuantize feeds its activation,
    its weight is an int8 constant)}; shape-only operations and the weight's dequantization are
    looked through, adaptive pooling (constant on the left) is left out."""
    import openvino as ov

    found = {}
    for op in ov.Core().read_model(str(xml_path)).get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul") or \
                op.input_value(0).get_node().get_type_name() == "Constant":
            continue
        weight = _producer(op.input_value(1), SHAPE_OPS + DEQUANTIZE_OPS)
        if weight.get_type_name() == "Constant":
            activation = _producer(op.input_value(0), SHAPE_OPS)
            found[op.get_friendly_name()] = (activation.get_type_name() == "FakeQuantize",
                                             weight.get_output_element_type(0).get_type_name()
                                             in ("i8", "u8"))
    return found


def _precision_config(tiny, layers=FLOAT_LAYERS, size=(64, 96)):
    from lrformer_edge.artifacts.precision_config import PrecisionConfig

    return PrecisionConfig("int8", {layer: "float" for layer in layers},
                           variant=tiny.config.name, input_size=size)


@pytest.mark.slow
def test_int8_with_a_precision_config_keeps_its_float_layers_unquantized(tiny, folder_int8,
                                                                        tmp_path):
    from lrformer_edge.backends.nncf_statistics import StatisticsKey
    from lrformer_edge.files import cache_dir

    calibration, plain = folder_int8
    config = _precision_config(tiny)
    cache = cache_dir() / "statistics" / StatisticsKey.of(tiny, (64, 96), calibration).file_name()
    before = cache.stat()
    result = export_openvino(tiny, tmp_path / "mixed", (64, 96), "int8", calibration=calibration,
                             precision_config=config)
    after = cache.stat()
    # The plain export's statistics cover this one's (fewer quantizers): nothing measured.
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    metadata = OpenVINORunner(result.path).metadata  # read back from the IR
    assert metadata["precision_config"] == config.metadata()
    float_nodes = metadata["float_layer_nodes"]
    assert list(float_nodes) == list(FLOAT_LAYERS) and len(float_nodes["backbone.d_convs1.0"]) \
        == len(tiny.backbone.block1)
    names = [name for layer in FLOAT_LAYERS for name in float_nodes[layer]]
    mixed, quantized = _weighted_ops(result.path), _weighted_ops(plain.path)
    for name in names:
        assert mixed[name] == (False, False), name  # float input, float weight
        assert quantized[name] == (True, True), name  # what plain INT8 made of it
    int8_weights = sum(weight for _, weight in mixed.values())
    assert int8_weights == sum(weight for _, weight in quantized.values()) - len(names) > 0
    assert result.parity.cosine > 0.999


def test_a_precision_config_naming_an_unknown_layer_is_refused(tiny, tmp_path):
    from lrformer_edge.data.calibration import build_calibration_set

    calibration = build_calibration_set("procedural", tiny.config.data, (64, 64), 1)
    config = _precision_config(tiny, ("backbone.block2.0.attn.kv0",), (64, 64))
    with pytest.raises(ValueError, match="did you mean 'backbone.block2.0.attn.kv.0'"):
        export_openvino(tiny, tmp_path / "x", (64, 64), "int8", calibration=calibration,
                        precision_config=config)
    with pytest.raises(ValueError, match="precision config apply to int8 only"):
        export_openvino(tiny, tmp_path / "x", (64, 64), "fp32",
                        precision_config=_precision_config(tiny, size=(64, 64)))
    assert not (tmp_path / "x").exists()


def test_to_openvino_refuses_a_precision_config_without_int8(tmp_path):
    config = tmp_path / "config.json"
    script = str(REPO / "export_scripts" / "to_openvino.py")
    fp32 = subprocess.run([sys.executable, script, "--precision", "fp16", "--precision-config",
                           str(config), "--output", str(tmp_path / "ir")],
                          capture_output=True, text=True)
    assert fp32.returncode == 2
    assert "--precision-config applies to --precision int8 only" in fp32.stderr
    missing = subprocess.run([sys.executable, script, "--precision", "int8",
                              "--precision-config", str(config), "--output", str(tmp_path / "ir")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"error: precision config {config} does not exist (expected a JSON file written by "
        f"calibration/sensitivity.py)"]


def test_a_runner_that_cannot_compile_says_so(fp32_ir, tiny):
    from lrformer_edge.artifacts.parity import check_parity
    from lrformer_edge.artifacts.result import ArtifactCheckError
    from lrformer_edge.artifacts.runner import RunnerStateError

    runner = OpenVINORunner(fp32_ir.path, device="NO_SUCH_DEVICE")
    with pytest.raises(RunnerStateError, match=f"OpenVINO cannot compile {fp32_ir.path.name} "
                                               f"for NO_SUCH_DEVICE"):
        with runner:
            pass
    feed = np.zeros((1, 3, 64, 96), np.float32)
    with pytest.raises(ArtifactCheckError, match="the IR cannot be run: OpenVINO cannot compile"):
        check_parity(to_deploy(tiny, (64, 96)), runner, feed, None, "the IR")


def test_int8_requires_calibration(tiny, tmp_path):
    with pytest.raises(ValueError, match="needs a calibration set"):
        export_openvino(tiny, tmp_path / "x", (64, 64), "int8")
    with pytest.raises(ValueError, match="int8 only"):
        export_openvino(tiny, tmp_path / "x", (64, 64), "fp32", max_drop=0.5)


def test_int8_with_accuracy_control(tiny, tmp_path, monkeypatch):
    """The accuracy-control path scores both models with our FP32-agreement mIoU. The bound is
    one the untrained tiny model meets at once: with a tight bound NNCF reverts layers one by
    one, which takes many minutes on this random model."""
    from lrformer_edge.backends.openvino import ptq
    from lrformer_edge.data.calibration import build_calibration_set

    scores = []
    original = ptq._miou_against_reference
    monkeypatch.setattr(ptq, "_miou_against_reference",
                        lambda model, data: scores.append(original(model, data)) or scores[-1])
    calibration = build_calibration_set("procedural", tiny.config.data, (64, 64), 6)
    result = export_openvino(tiny, tmp_path / "ac", (64, 64), "int8", calibration=calibration,
                             max_drop=100.0)
    assert result.metadata["quantization"]["accuracy_control_max_drop_miou_points"] == 100.0
    assert len(scores) >= 2 and scores[0] == pytest.approx(1.0)  # FP32 agrees with itself
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_benchmark_runs_every_available_backend(tiny, tmp_path):
    from lrformer_edge.benchmark import (
        benchmark_title,
        cpu_notes,
        markdown_table,
        run_benchmark,
    )
    from lrformer_edge.cpu import host_cpu

    rows = run_benchmark(tiny, (64, 64), tmp_path, eval_images=2, iterations=3, warmup=1,
                         calibration_images=4, log=lambda *_: None)
    assert [(r.backend, r.precision) for r in rows] == [
        ("pytorch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"),
        ("openvino", "bf16"), ("openvino", "int8"), ("openvino", "int8+bf16")]
    assert rows[0].speedup_vs_pytorch == 1.0 and rows[0].agreement_vs_pytorch == 1.0
    for row in rows:
        if row.precision.endswith("bf16"):
            # Measured as bf16 only where the CPU runs bf16; elsewhere skipped, saying why.
            assert row.settings["requested_precision"] == "bf16"
            if row.status != "ok":
                assert row.status.startswith("skipped: the bf16 hint ran in f32 on this CPU")
                assert row.settings["inference_precision"] == "f32" and row.median_ms is None
                continue
            assert row.settings["inference_precision"] == "bf16"
        assert row.median_ms > 0 and row.p99_ms >= row.median_ms and row.fps > 0
        assert 0 <= row.miou <= 1 and row.agreement_vs_pytorch > 0.9
        assert row.settings["cpu_isa"] == host_cpu().isa
    assert rows[1].agreement_vs_pytorch > 0.999  # ORT FP32 is exact
    table = markdown_table(rows, benchmark_title("tiny", (64, 64), 2, 2), cpu_notes())
    assert "| openvino | int8 |" in table and host_cpu().describe() in table
    assert ("no VNNI" in table) == (host_cpu().x86 and not host_cpu().vnni)


def test_layer_profile_of_an_ir(fp32_ir, tmp_path):
    from lrformer_edge.artifacts.runner import RunnerStateError
    from lrformer_edge.backends.openvino.profile import profile_layers, profile_table

    feed = {"input": np.random.default_rng(0).random((1, 3, 64, 96), np.float32)}
    with OpenVINORunner(fp32_ir.path) as plain:
        plain.infer(feed)
        with pytest.raises(RunnerStateError, match="profile=True"):
            plain.layer_times()
    with OpenVINORunner(fp32_ir.path, profile=True) as runner:
        profile = profile_layers(runner, feed, repeats=3, warmup=1)
    assert profile.total_ms > 0 and profile.wall_ms > 0
    assert any(node_type == "Convolution" for _, _, node_type, _ in profile.kinds)
    assert abs(sum(ms for ms, *_ in profile.kinds) - profile.total_ms) < 1e-6
    assert profile.nodes[0][0] == max(ms for ms, *_ in profile.nodes)
    table = profile_table(profile, top=5)
    assert "| ms | % | slowest 5 nodes | type | kernel |" in table

    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, str(REPO / "deploy" / "profile_openvino.py"), "--ir",
                           str(fp32_ir.path.parent), "--repeats", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "precision f32" in done.stdout and "slowest 15 nodes" in done.stdout
    import json

    assert json.loads(out.read_text())["settings"]["inference_precision"] == "f32"
    missing = subprocess.run([sys.executable, str(REPO / "deploy" / "profile_openvino.py"),
                              "--ir", str(tmp_path / "none.xml")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.startswith("error:"), missing.stderr


def test_the_compile_check_names_every_hint_whatever_the_cpu():
    from lrformer_edge.backends.openvino.runner import PRECISIONS, native_precisions

    native = native_precisions()
    assert "f32" in native and set(native) <= set(PRECISIONS)
    line = compile_check_line()
    assert all(hint in line for hint in PRECISIONS)
    assert ("run as f32 on this CPU" in line) == (len(native) < len(PRECISIONS))


def test_the_compile_check_skips_the_hints_the_parity_check_ran(fp32_ir, monkeypatch):
    """The parity check compiles and runs the f32 program: the compile check does not compile
    it again (5 s of an LRFormer-T export), and still compiles every other native hint."""
    from lrformer_edge.backends.openvino import export
    from lrformer_edge.backends.openvino.runner import native_precisions

    compiled = []
    runner_class = export.OpenVINORunner

    def recording_runner(xml, precision, **options):
        compiled.append(precision)
        return runner_class(xml, precision=precision, **options)

    monkeypatch.setattr(export, "OpenVINORunner", recording_runner)
    export.compiles_under_every_hint(fp32_ir.path)
    assert compiled == list(native_precisions())
    compiled.clear()
    export.compiles_under_every_hint(fp32_ir.path, checked=("f32",))
    assert compiled == [hint for hint in native_precisions() if hint != "f32"]
