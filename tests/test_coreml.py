"""Core ML target: conversion and package checks run everywhere; prediction needs macOS."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools", reason="Core ML export needs the 'coreml' extra: "
                                          "pip install -e '.[coreml]'")

import lrformer_edge  # noqa: E402
from lrformer_edge.artifacts.result import ArtifactCheckError
from lrformer_edge.backends import load_runner
from lrformer_edge.backends.coreml.export import (
    PREVIEW_PARAMS_KEY,
    PREVIEW_TYPE_KEY,
    CoreMLOptions,
    export_coreml,
    proxy_model,
)
from lrformer_edge.backends.coreml.inspect import compare_weights, inspect_package
from lrformer_edge.backends.coreml.runner import CoreMLRunner, CoreMLUnavailable
from lrformer_edge.data.calibration import build_calibration_set
from lrformer_edge.evaluation import proxy_accuracy
from lrformer_edge.models.deploy import to_deploy  # noqa: E402
from lrformer_edge.postprocess import labels_at_size
from lrformer_edge.registry import BUNDLED_MODEL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = (128, 128)
ON_MACOS = sys.platform == "darwin"
needs_macos = pytest.mark.skipif(
    not ON_MACOS,
    reason=f"Core ML prediction needs macOS on Apple hardware; this is {sys.platform}")


def attention_layers(model) -> int:
    return sum(1 for m in to_deploy(model, SIZE).modules() if hasattr(m, "static_pools"))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return lrformer_edge.create_model("lrformer-test")


@pytest.fixture(scope="module")
def fp16_package(tiny, tmp_path_factory):
    return export_coreml(tiny, tmp_path_factory.mktemp("coreml") / "tiny.mlpackage", SIZE)


def test_fp16_package_structure_and_metadata(fp16_package, tiny):
    report = inspect_package(fp16_package.path)
    assert report.spec_version == 9 and report.target.startswith("iOS18")
    assert report.inputs == [{"name": "image", "kind": "image", "shape": [1, 3, *SIZE],
                              "color": "RGB"}]
    assert report.outputs == [{"name": "logits", "kind": "tensor", "dtype": "float32",
                               "shape": [1, tiny.config.num_classes, *SIZE]}]
    assert report.fp16_compute, report.compute_dtypes
    # iOS18: every LRSA attention is one fused op (the official scale is SDPA's default).
    assert report.op_counts.get("scaled_dot_product_attention") == attention_layers(tiny)
    assert "softmax" not in report.op_counts
    assert set(report.weight_dtypes) == {"float16"}
    from lrformer_edge.files import default_file_mode

    # Written through a temporary folder, yet with the mode of a normal folder (not mkdtemp's).
    assert fp16_package.path.stat().st_mode & 0o777 == default_file_mode() | 0o111
    metadata = report.metadata
    assert metadata[PREVIEW_TYPE_KEY] == "imageSegmenter"
    assert json.loads(metadata[PREVIEW_PARAMS_KEY])["labels"] == list(tiny.config.data.class_names)
    assert json.loads(metadata["lrformer_edge.mean"]) == list(tiny.config.data.mean)
    assert metadata["lrformer_edge.variant"] == "lrformer-test"
    assert json.loads(metadata["lrformer_edge.coreml_options"])["precision"] == "fp16"


def test_fp16_weights_read_back_match_pytorch(fp16_package):
    weights = fp16_package.metadata["weights"]
    # Random weights are not fp16-exact: the comparison sees the rounding, and no more.
    assert weights["compared"] >= 40 and weights["by_storage"] == {"float16": weights["compared"]}
    assert 0 < weights["worst_relative_error"] <= 2 ** -10
    assert weights["min_cosine"] > 0.99999
    # Not found by name: only convolutions the converter merged with what follows them
    # (the stem's and the squeezes' BatchNorms; the layer scales after the MLPs of backbone
    # stages 3-4 and of the decoder).
    merged = ("patch_embed1_conv1", "decode_head_squeeze", "decode_head_fuse_block1_mlp_fc2",
              "decode_head_fuse_block2_mlp_fc2", "block3_0_mlp_fc2", "block4_0_mlp_fc2")
    assert weights["not_found"] and all(any(part in name for part in merged)
                                        for name in weights["not_found"]), weights["not_found"]


def test_weight_check_names_a_changed_tensor(fp16_package, tiny):
    from lrformer_edge.backends.coreml.export import _adapter

    changed = to_deploy(tiny, SIZE).eval()
    name = "backbone.block2.0.attn.q.0.weight"
    with torch.no_grad():
        changed.get_parameter(name).mul_(1.5)
    adapter = _adapter(changed, tiny.config.data, CoreMLOptions())
    comparison = compare_weights(fp16_package.path, adapter)
    assert comparison.worst_tensor == "p_net_" + name.replace(".", "_")
    assert comparison.worst_relative_error > 0.3


def test_int8_weights_are_stored_as_int8(tiny, fp16_package, tmp_path):
    result = export_coreml(tiny, tmp_path / "w8.mlpackage", SIZE,
                           CoreMLOptions(weights="int8", input_type="tensor"))
    report = inspect_package(result.path)
    assert report.weight_dtypes.get("int8", 0) > 0
    assert report.inputs[0] == {"name": "input", "kind": "tensor", "dtype": "float32",
                                "shape": [1, 3, *SIZE]}
    weights = result.metadata["weights"]
    assert weights["by_storage"].get("int8", 0) > 0
    assert weights["worst_relative_error"] <= 0.5 / 127 + 2e-3
    assert report.size_bytes < 0.75 * inspect_package(fp16_package.path).size_bytes


@pytest.mark.slow
def test_palette4_with_label_output(tiny, tmp_path):
    result = export_coreml(tiny, tmp_path / "p4.mlpackage", SIZE,
                           CoreMLOptions(weights="palette4", output_type="labels"))
    report = inspect_package(result.path)
    assert report.outputs == [{"name": "labels", "kind": "tensor", "dtype": "int32",
                               "shape": [1, *SIZE]}]
    assert report.weight_dtypes.get("palettized", 0) > 0
    assert result.metadata["weights"]["min_cosine"] >= 0.99


@pytest.mark.slow
def test_w8a8_package_and_its_proxy(tiny, tmp_path):
    calibration = build_calibration_set("procedural", tiny.config.data, SIZE, 4, 0)
    result = export_coreml(tiny, tmp_path / "w8a8.mlpackage", SIZE, CoreMLOptions(w8a8=True),
                           calibration)
    report = inspect_package(result.path)
    layers = result.metadata["w8a8_layers"]
    assert report.op_counts["quantize"] >= layers and report.op_counts["dequantize"] >= layers
    weights = result.metadata["weights"]
    assert weights["compared"] == layers and weights["by_storage"] == {"int8": layers}
    assert weights["not_found"] == []
    assert result.metadata["calibration_set"]["sha256"] == calibration.sha256
    accuracy = proxy_accuracy(tiny, proxy_model(tiny, result.path, calibration=calibration), 2,
                              SIZE)
    assert accuracy["weights_read_back"] >= layers
    assert accuracy["pixel_agreement"] > 0.9
    with pytest.raises(ValueError, match="calibrated on a set with SHA-256"):
        proxy_model(tiny, result.path, calibration=build_calibration_set(
            "procedural", tiny.config.data, SIZE, 2, 1))


@pytest.mark.parametrize("options, message", [
    (dict(w8a8=True, target="iOS16"), "iOS17"),
    (dict(w8a8=True, weights="palette4"), "palette4"),
    (dict(precision="int4"), "precision must be one of"),
    (dict(target="iOS12"), "target must be one of"),
])
def test_invalid_options_say_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        CoreMLOptions(**options)


def test_bad_output_path_and_failed_check_write_nothing(tiny, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\.mlpackage folder"):
        export_coreml(tiny, tmp_path / "model.onnx", SIZE)
    import lrformer_edge.backends.coreml.export as coreml

    monkeypatch.setattr(coreml, "check_package", lambda *a: ["weights differ"])
    with pytest.raises(ArtifactCheckError, match="weights differ"):
        export_coreml(tiny, tmp_path / "bad.mlpackage", SIZE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(ON_MACOS, reason="checks the error raised where Core ML does not exist")
def test_runner_describes_the_package_and_refuses_to_predict_off_macos(fp16_package):
    runner = load_runner(fp16_package.path)
    assert isinstance(runner, CoreMLRunner)
    assert runner.input_specs[0].shape == (1, 3, *SIZE)
    assert runner.output_names == ["logits"]
    assert runner.metadata["variant"] == "lrformer-test"
    with pytest.raises(CoreMLUnavailable, match="needs macOS"):
        with runner:
            pass


@needs_macos
def test_runner_matches_pytorch_on_macos(fp16_package, tiny):
    from lrformer_edge.pipeline import SegmentationPipeline

    image = np.random.default_rng(0).integers(0, 256, (100, 140, 3), dtype=np.uint8)
    with SegmentationPipeline.from_artifact(fp16_package.path) as pipeline:
        labels = pipeline(image)
    with SegmentationPipeline.from_model(tiny, SIZE) as reference:
        expected = reference(image)
    assert (labels == expected).mean() > 0.99


def test_label_outputs_resize_by_nearest_neighbour():
    labels = np.array([[[1, 2], [3, 4]]], dtype=np.int32)
    resized = labels_at_size(labels, (4, 6))
    assert resized.shape == (4, 6) and resized.dtype == np.uint8
    assert set(np.unique(resized)) == {1, 2, 3, 4}


def test_validation_lists_the_package_as_skipped_off_macos(fp16_package, tmp_path):
    if ON_MACOS:
        pytest.skip("on macOS the package is validated, not skipped")
    from lrformer_edge.validation import ValidationConfig, run_validation

    outcome = run_validation(ValidationConfig([fp16_package.path], tmp_path / "report",
                                              variant="lrformer-test", images=1, input_size=SIZE,
                                              log=lambda *_: None))
    row = [r for r in outcome.run.results if r.backend == "coreml"][0]
    assert row.status == "skipped" and "needs macOS" in row.reason
    assert row.precision == "fp16" and outcome.violations == []


@pytest.mark.slow
def test_to_coreml_cli_bundled_model(tmp_path):
    """Acceptance: the bundled LRFormer-T converts at 512x512 (FP16 with int8 weights: the FP16
    conversion plus weight quantization, one conversion of LRFormer-T instead of two)."""
    script = str(REPO / "export_scripts" / "to_coreml.py")
    int8 = subprocess.run([sys.executable, script, "--weights", "int8", "--proxy-images", "2",
                           "--output", str(tmp_path / "t8.mlpackage")],
                          capture_output=True, text=True, timeout=600)
    assert int8.returncode == 0, int8.stderr
    assert "PyTorch proxy on 2 held-out scenes" in int8.stdout
    report = inspect_package(tmp_path / "t8.mlpackage")
    assert "scaled_dot_product_attention" in report.op_counts
    assert report.metadata["lrformer_edge.variant"] == BUNDLED_MODEL
    assert report.weight_dtypes["int8"] > 100
    bad = subprocess.run([sys.executable, script, "--w8a8", "--target", "iOS16", "--output",
                          str(tmp_path / "x.mlpackage")], capture_output=True, text=True)
    assert bad.returncode == 2 and "iOS17" in bad.stderr and "Traceback" not in bad.stderr
    wrong = subprocess.run([sys.executable, script, "--output", str(tmp_path / "x.onnx")],
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and ".mlpackage" in wrong.stderr
    assert not (tmp_path / "x.mlpackage").exists() and not (tmp_path / "x.onnx").exists()
