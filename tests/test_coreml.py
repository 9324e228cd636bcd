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
    # Kernels the converter merged with what follows them are found through the merged op and
    # compared times that factor: the stem's and the squeezes' BatchNorms...
    assert weights["not_found"] == [] and weights["folded"] == 5
    # ... and the untrained layer scales (1e-6) after the MLPs of backbone stages 3-4 and of the
    # decoder, whose products are float16 subnormals: found, not compared.
    assert sorted(weights["subnormal"]) == sorted(
        f"p_net_{name}_mlp_fc2_weight" for name in (
            "backbone_block3_0", "backbone_block4_0", "decode_head_fuse_block1",
            "decode_head_fuse_block2"))


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
    (dict(w8a8=True, weights="int4"), "int4"),
    (dict(weights="int4", target="iOS17"), "iOS18"),
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


# ----------------------------------------------------------------------------- precision configs
# Some layers raised to int8 (one of them with its BatchNorm folded in by the converter), one to
# int4, two kept float (one with its layer scale folded in); every other layer palette4.
MIXED_OVERRIDES = {"backbone.block4.0.mlp.fc1": "int8", "decode_head.squeeze1.conv": "int8",
                   "backbone.block4.0.attn.kv.0": "weights-int4",
                   "backbone.patch_embed4.proj": "float", "backbone.block4.0.mlp.fc2": "float"}


def _mixed_config(model, **changes):
    from lrformer_edge.artifacts.precision_config import PrecisionConfig

    fields = dict(scheme="palette4", overrides=MIXED_OVERRIDES, variant=model.config.name,
                  input_size=SIZE, selection={"by": "test"})
    return PrecisionConfig(**{**fields, **changes})


def _deploy_layers(model):
    from lrformer_edge.models.layers import quantizable_layers

    return quantizable_layers(to_deploy(model, SIZE, fold_mlp_residuals=False))


@pytest.fixture(scope="module")
def mixed(tiny, tmp_path_factory):
    """The package of a mixed config, made through the registry as the sensitivity front does."""
    from lrformer_edge.backends import get_backend

    config = _mixed_config(tiny)
    backend = get_backend("coreml")
    result = backend.export_mixed(tiny, tmp_path_factory.mktemp("coreml-mixed"), SIZE, config,
                                  None)
    return result, config


def test_every_layer_maps_to_one_weight_constant_of_the_program(fp16_package, tiny):
    from lrformer_edge.backends.coreml.export import _adapter
    from lrformer_edge.backends.coreml.inspect import load_program
    from lrformer_edge.backends.coreml.layer_map import map_layer_weights

    deployed = to_deploy(tiny, SIZE, fold_mlp_residuals=False).eval()
    example = torch.rand(1, 3, *SIZE) * 255
    with torch.no_grad():
        exported = torch.export.export(_adapter(deployed, tiny.config.data, CoreMLOptions()),
                                       (example,)).run_decompositions({})
    _, program = load_program(fp16_package.path)
    consts = {op.name: op for op in program.functions["main"].operations
              if op.op_type == "const"}
    layers = _deploy_layers(tiny)
    mapping = map_layer_weights(exported, program, layers)
    assert list(mapping) == [layer.name for layer in layers]
    assert len({weight.const for weight in mapping.values()}) == len(layers)
    for layer in layers:  # output-channel first, as the layer's weight (Linear untransposed)
        shape = consts[mapping[layer.name].const].outputs[0].shape
        assert tuple(shape) == tuple(deployed.get_submodule(layer.name).weight.shape), layer
    folds = {layer: weight.fold for layer, weight in mapping.items() if weight.fold}
    assert folds == {
        **{f"backbone.patch_embed1.conv1.{i}": f"backbone.patch_embed1.conv1.{i + 1}"
           for i in (0, 3, 6)},
        **{f"decode_head.squeeze{i}.conv": f"decode_head.squeeze{i}.bn" for i in (1, 2)},
        **{f"{block}.mlp.fc2": f"{block}.layer_scale_2" for block in (
            "backbone.block3.0", "backbone.block4.0", "decode_head.fuse_block1",
            "decode_head.fuse_block2")}}


@pytest.mark.slow
def test_a_mixed_package_stores_each_layer_in_its_form(mixed, tiny):
    from lrformer_edge.backends.coreml.compression import (
        COMPRESSION_MIN_WEIGHTS,
        compressed_weight_bytes,
        stored_weight_bytes,
    )

    result, config = mixed
    assert result.path.name.startswith("lrformer-test-palette4-mixed-")
    storage = result.metadata["layer_storage"]
    forms = {layer: entry["form"] for layer, entry in storage.items()}
    assert {layer: forms[layer] for layer in MIXED_OVERRIDES} == {
        "backbone.block4.0.mlp.fc1": "int8", "decode_head.squeeze1.conv": "int8",
        "backbone.block4.0.attn.kv.0": "int4", "backbone.patch_embed4.proj": "float16",
        "backbone.block4.0.mlp.fc2": "float16"}
    layers = _deploy_layers(tiny)
    for layer in layers:
        if layer.name in MIXED_OVERRIDES:
            continue
        small = layer.weight_elements <= COMPRESSION_MIN_WEIGHTS
        ungroupable = layer.out_channels % 16 != 0  # decode_head.conv_seg's 150 classes
        assert forms[layer.name] == ("float16" if small or ungroupable else "palettized"), layer
    assert forms["decode_head.conv_seg"] == "float16"
    # Read from the package itself: exactly these compressed tensors, nothing else compressed.
    stored = inspect_package(result.path).weight_dtypes
    assert stored["int8"] == 2 and stored["int4"] == 1
    assert stored["palettized"] == list(forms.values()).count("palettized") > 3
    # The size rule the selection plans with is what the package holds, layer by layer.
    for layer in layers:
        assert storage[layer.name]["bytes"] == stored_weight_bytes(layer, forms[layer.name])
    assert compressed_weight_bytes(layers, config.precision_of) == \
        sum(entry["bytes"] for entry in storage.values())


@pytest.mark.slow
def test_a_mixed_package_records_its_config_and_has_a_gate_row(mixed):
    from lrformer_edge.artifacts.metadata import decode_metadata
    from lrformer_edge.backends.coreml.export import package_summary
    from lrformer_edge.validation.gate import load_thresholds
    from lrformer_edge.validation.harness import describe_artifact

    result, config = mixed
    metadata = decode_metadata(inspect_package(result.path).metadata)
    assert metadata["precision_config"] == config.metadata()
    assert json.loads(json.dumps(metadata["coreml_options"]))["weights"] == "palette4"
    description = describe_artifact(result.path)
    assert description.precision == "fp16+mixed"
    assert load_thresholds()["backends"]["coreml"]["fp16+mixed"]["max_miou_drop_points"] > 0
    line = next(line for line in package_summary(result.metadata) if line.startswith("layers:"))
    assert "int8 2" in line and "int4 1" in line and config.sha256[:12] in line


@pytest.mark.slow
def test_the_proxy_of_a_mixed_package_computes_with_its_weights(mixed, tiny):
    from lrformer_edge.backends.coreml.layer_map import fold_scale

    result, _ = mixed
    proxy = proxy_model(tiny, result.path)
    deployed = to_deploy(tiny, SIZE, fold_mlp_residuals=False)
    assert proxy.package_weights_loaded == len(_deploy_layers(tiny))

    def weights(name):
        return (proxy.get_submodule(name).weight.detach(),
                deployed.get_submodule(name).weight.detach())

    stored, original = weights("backbone.block4.0.mlp.fc1")  # int8: 255 levels per channel
    steps = original.abs().amax(dim=1, keepdim=True) / 127  # + fp16 scales and products:
    assert 0 < (stored - original).abs().max() <= 0.5 * steps.max() + 2e-3 * original.abs().max()
    assert all(len(torch.unique(row)) <= 255 for row in stored)
    # Folded with its BatchNorm: the int8 levels are those of weight x BatchNorm scale.
    stored, original = weights("decode_head.squeeze1.conv")
    scale = fold_scale(deployed, "decode_head.squeeze1.bn").view(-1, 1, 1, 1)
    folded_steps = (original * scale).abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    levels = stored * scale / folded_steps  # integers, up to the fp16 rounding of the products
    assert (levels - levels.round()).abs().max() < 0.1 and not torch.equal(stored, original)
    stored, original = weights("backbone.patch_embed4.proj")  # kept float: fp16 rounding only
    assert torch.equal(stored, original.half().float())
    stored, original = weights("backbone.block3.0.mlp.fc1")  # palette4: 16 values per 16 rows
    assert len(torch.unique(stored[:16])) <= 16 and not torch.equal(stored, original)
    accuracy = proxy_accuracy(tiny, proxy, 2, SIZE)
    assert accuracy["weights_read_back"] == proxy.package_weights_loaded
    assert accuracy["pixel_agreement"] > 0.9


@pytest.mark.parametrize("changes, options, message", [
    (dict(overrides={"backbone.block9.0.mlp.fc1": "int8"}), {}, "does not have"),
    (dict(input_size=(64, 64)), {}, "input size 64x64"),
    (dict(variant="lrformer-t"), {}, "variant lrformer-t"),
    ({}, dict(weights="int8"), "stores palette4 weights, but int8 weights were asked for"),
    (dict(scheme="int8", overrides={}), dict(weights="int8", w8a8=True), "W8A8 takes none"),
])
def test_a_precision_config_that_does_not_fit_is_refused_before_any_work(
        tiny, tmp_path, changes, options, message):
    config = _mixed_config(tiny, **changes)
    options = CoreMLOptions(**{"weights": "palette4", **options})
    with pytest.raises(ValueError, match=message):
        export_coreml(tiny, tmp_path / "x.mlpackage", SIZE, options, precision_config=config)
    assert list(tmp_path.iterdir()) == []


def test_to_coreml_takes_the_weights_from_the_precision_config(tiny, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "export_scripts"))
    try:
        import to_coreml
    finally:
        sys.path.pop(0)
    path = _mixed_config(tiny).save(tmp_path / "config.json")
    common = ["--variant", "lrformer-test", "--precision-config", str(path), "--output",
              str(tmp_path / "m.mlpackage")]
    args = to_coreml.parse_args(common)
    assert args.options.weights == "palette4" and args.config == _mixed_config(tiny)
    assert to_coreml.parse_args(common + ["--weights", "palette4"]).options.weights == "palette4"
    with pytest.raises(SystemExit) as stopped:
        to_coreml.parse_args(common + ["--weights", "int8"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2 and "Traceback" not in error
    assert "scheme palette4 stores palette4 weights, but int8 weights were asked for" in error
    assert list(tmp_path.iterdir()) == [path]
