"""Core ML export: an ML program (.mlpackage) of the deploy form, FP16 or FP32 compute, optional
int8 / 4-bit palettised weights or W8A8, with the metadata that lets Xcode preview it as a
segmenter.

Path: ``to_deploy`` -> an input adapter (mean/std folded in for image inputs, optional argmax)
-> ``torch.export`` + ``run_decompositions`` -> ``coremltools.convert`` -> weight compression
-> package written to a temporary folder and renamed. Core ML predicts only on macOS, so on other
systems the package is checked structurally (``inspect_package``) and its weights are read back
and compared with the PyTorch weights (``compare_weights``); for W8A8 the PyTorch model with the
same Q/DQ ops is the numerical proxy.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.metadata import artifact_metadata, decode_metadata
from lrformer_edge.artifacts.result import ArtifactCheckError, ExportResult
from lrformer_edge.artifacts.staging import check_replaceable_folder, staged_directory
from lrformer_edge.backends.coreml.inspect import (
    SPEC_VERSION_OF_TARGET,
    compare_program_weights,
    coremltools_module,
    export_name,
    load_program,
    package_input_size,
    package_report,
    package_weights,
    weight_aliases,
)
from lrformer_edge.files import default_file_mode
from lrformer_edge.progress import heartbeat
from lrformer_edge.registry import input_size_of

TARGETS = ("iOS16", "iOS17", "iOS18", "macOS15")
PRECISIONS = ("fp16", "fp32")
WEIGHT_MODES = ("float", "int8", "palette4")
OUTPUT_TYPES = ("logits", "labels")
INPUT_TYPES = ("image", "tensor")
INPUT_NAME = "image"
TENSOR_INPUT_NAME = "input"
# Layers with fewer weights stay float: their compression saves nothing and costs accuracy.
COMPRESSION_MIN_WEIGHTS = 2048
PALETTE_GROUP_SIZE = 16
PREVIEW_TYPE_KEY = "com.apple.coreml.model.preview.type"
PREVIEW_PARAMS_KEY = "com.apple.coreml.model.preview.params"


@dataclass(frozen=True)
class CoreMLOptions:
    precision: str = "fp16"  # compute precision of the ML program
    weights: str = "float"  # float | int8 (per-channel linear) | palette4 (4-bit k-means LUT)
    w8a8: bool = False  # int8 activations too (needs calibration), implies int8 weights
    target: str = "iOS18"  # minimum deployment target
    output_type: str = "logits"  # logits (1, C, H, W) float32 | labels (1, H, W) int32
    input_type: str = "image"  # image: RGB pixels 0..255, mean/std in the model | tensor

    def __post_init__(self) -> None:
        for name, allowed in (("precision", PRECISIONS), ("weights", WEIGHT_MODES),
                              ("target", TARGETS), ("output_type", OUTPUT_TYPES),
                              ("input_type", INPUT_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Core ML {name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if self.w8a8 and self.weights == "palette4":
            raise ValueError("W8A8 stores int8 weights; it cannot be combined with palette4 "
                             "weights (use --weights int8 or float with --w8a8)")
        if self.w8a8 and self.target == "iOS16":
            raise ValueError("W8A8 needs int8 activation ops, which Core ML has from iOS17: "
                             "choose --target iOS17, iOS18 or macOS15")
        if self.w8a8 and self.precision != "fp16":
            raise ValueError("W8A8 runs its float parts in fp16 on Apple's Neural Engine; "
                             "use --precision fp16 with --w8a8")

    @property
    def weights_stored(self) -> str:
        return "int8" if self.w8a8 else self.weights


def _adapter(deployed, data_config, options: CoreMLOptions):
    import torch
    from torch import nn

    class Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = deployed
            mean = torch.tensor(data_config.mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(data_config.std, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer("mean", mean)
            self.register_buffer("inverse_std", 1.0 / std)
            self.image_input = options.input_type == "image"
            self.labels = options.output_type == "labels"

        def forward(self, x):
            if self.image_input:
                # ImageType has one scale for all channels; per-channel std needs the model.
                x = (x - self.mean) * self.inverse_std
            logits = self.net(x)
            if self.labels:
                return logits.argmax(dim=1).to(torch.int32)
            return logits

    return Adapter().eval()


def _convert(ct, adapter, input_size, options: CoreMLOptions):
    import torch

    height, width = input_size
    example = torch.rand(1, 3, height, width) * (255.0 if options.input_type == "image" else 1.0)
    with torch.no_grad():
        program = torch.export.export(adapter, (example,)).run_decompositions({})
    if options.input_type == "image":
        inputs = [ct.ImageType(name=INPUT_NAME, shape=(1, 3, height, width),
                               color_layout=ct.colorlayout.RGB, scale=1.0, bias=[0.0, 0.0, 0.0])]
    else:
        inputs = [ct.TensorType(name=TENSOR_INPUT_NAME, shape=(1, 3, height, width),
                                dtype=np.float32)]
    output_dtype = np.int32 if options.output_type == "labels" else np.float32
    precision = ct.precision.FLOAT16 if options.precision == "fp16" else ct.precision.FLOAT32
    mlmodel = ct.convert(program, inputs=inputs,
                         outputs=[ct.TensorType(name=options.output_type, dtype=output_dtype)],
                         convert_to="mlprogram", compute_precision=precision,
                         minimum_deployment_target=getattr(ct.target, options.target),
                         skip_model_load=sys.platform != "darwin")
    return mlmodel, weight_aliases(program)


def _compress(ct, mlmodel, options: CoreMLOptions):
    if options.w8a8 or options.weights == "float":
        return mlmodel  # W8A8 weights are int8 already (constexpr ops from the Q/DQ graph)
    import coremltools.optimize.coreml as cto

    if options.weights == "int8":
        op_config = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel",
            weight_threshold=COMPRESSION_MIN_WEIGHTS)
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_config))
    # iOS18 packages hold one LUT per group of output channels: far smaller errors than one
    # LUT per tensor, for a few hundred bytes per layer.
    grouped = {"granularity": "per_grouped_channel", "group_size": PALETTE_GROUP_SIZE} \
        if options.target in ("iOS18", "macOS15") else {}
    op_config = cto.OpPalettizerConfig(mode="kmeans", nbits=4,
                                       weight_threshold=COMPRESSION_MIN_WEIGHTS, **grouped)
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_config))


def _describe(mlmodel, model, input_size, options: CoreMLOptions, metadata: dict) -> None:
    data = model.config.data
    mlmodel.short_description = (
        f"LRFormer ({model.config.name}) semantic segmentation, {data.num_classes} classes, "
        f"{input_size[0]}x{input_size[1]}")
    mlmodel.author = "lrformer-edge (LRFormer: Wu et al., TPAMI 2025)"
    mlmodel.version = str(metadata.get("lrformer_edge.toolkit_version", ""))
    input_name = INPUT_NAME if options.input_type == "image" else TENSOR_INPUT_NAME
    mlmodel.input_description[input_name] = (
        "RGB image, pixels 0..255 (normalisation is inside the model)"
        if options.input_type == "image" else "RGB, (pixel - mean) / std, NCHW float32")
    mlmodel.output_description[options.output_type] = (
        "class id per pixel (1, H, W)" if options.output_type == "labels"
        else "class logits (1, num_classes, H, W) at input resolution")
    user = mlmodel.user_defined_metadata
    for key, value in metadata.items():
        user[key] = value
    user[PREVIEW_TYPE_KEY] = "imageSegmenter"
    user[PREVIEW_PARAMS_KEY] = json.dumps({"labels": list(data.class_names)})


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ValueError(f"a Core ML ML program is a .mlpackage folder; got output {path} "
                         f"(name it e.g. {path.with_suffix('.mlpackage').name})")
    return check_replaceable_folder(path)


def export_coreml(model, output: str | Path, input_size=None,
                  options: CoreMLOptions = CoreMLOptions(), calibration=None) -> ExportResult:
    """Write ``output`` (.mlpackage) and check it; the result's ``metadata`` holds the package
    report, the weight comparison and (W8A8) the proxy model's agreement with FP32."""
    from lrformer_edge.models.deploy import check_input_size, to_deploy

    ct = coremltools_module()
    output = check_output_path(output)
    input_size = check_input_size(input_size_of(model, input_size))
    if options.w8a8 and calibration is None:
        raise ValueError("W8A8 needs a calibration set (build_calibration_set(...))")
    if not options.w8a8 and calibration is not None:
        raise ValueError("calibration data applies to W8A8 only")
    start = time.time()
    # Unfolded MLP kernels: folding the identity would cost the fp16 centre taps resolution,
    # and every kernel stays comparable by name with the package (see to_deploy).
    deployed = to_deploy(model, input_size, fold_mlp_residuals=False).eval()
    quantization = {}
    if options.w8a8:
        from lrformer_edge.backends.coreml.w8a8 import W8A8Settings, quantize_w8a8

        settings = W8A8Settings()
        deployed = quantize_w8a8(deployed, calibration, settings)
        quantization = {"quantization": settings.as_dict(),
                        "calibration_set": calibration.describe(),
                        "w8a8_layers": deployed.w8a8_layers}
    adapter = _adapter(deployed, model.config.data, options)
    with heartbeat("Core ML conversion (torch.export, coremltools)"):
        mlmodel, aliases = _convert(ct, adapter, input_size, options)
    with heartbeat("Core ML weight compression"):
        mlmodel = _compress(ct, mlmodel, options)
    metadata = artifact_metadata(
        model, input_size, format="coreml-mlprogram", coreml_options=asdict(options),
        coremltools_version=ct.__version__,
        input_layout=("RGB image 0..255, mean/std applied inside the model"
                      if options.input_type == "image"
                      else "NCHW float32, RGB, (pixel - mean) / std"),
        output=("labels (1, H, W) int32 at input resolution" if options.output_type == "labels"
                else "logits (1, num_classes, H, W) float32 at input resolution"),
        **quantization)
    _describe(mlmodel, model, input_size, options, metadata)
    with staged_directory(output, suffix=".mlpackage") as staged, \
            heartbeat(f"writing and checking {output.name}"):
        mlmodel.save(str(staged))  # replaces the empty folder with the package
        staged.chmod(default_file_mode() | 0o111)
        spec, program = load_program(staged)
        report = package_report(staged, spec, program)
        weights = compare_program_weights(program, adapter, aliases)
        result = ExportResult(output, None, time.time() - start, report.op_counts,
                              {**decode_metadata(metadata), "package": report.as_dict(),
                               "weights": weights.as_dict()})
        problems = check_package(result, options, input_size)
        if problems:
            raise ArtifactCheckError(f"{output.name}: " + "; ".join(problems))
    return result


# ----------------------------------------------------------------------------- inspection


def expected_weight_error(options: CoreMLOptions) -> tuple[float, float]:
    """(largest relative error, smallest cosine) a faithful package of ``options`` can show."""
    if options.weights_stored == "int8":
        return 0.5 / 127 + 2e-3, 0.999  # half an int8 step (+ fp16 scales)
    if options.weights_stored == "palette4":
        # 16 k-means levels per group: outlying weights sit in wide cells, so only the
        # direction of each tensor is checked.
        return math.inf, 0.99
    return (2 ** -10 if options.precision == "fp16" else 1e-7), 0.99999


def check_package(result: ExportResult, options: CoreMLOptions, input_size) -> list[str]:
    """Problems of an exported package against what ``options`` asked for (empty: none)."""
    report, weights = result.metadata["package"], result.metadata["weights"]
    problems = []
    if report["spec_version"] != SPEC_VERSION_OF_TARGET[options.target]:
        problems.append(f"spec version {report['spec_version']}, expected "
                        f"{SPEC_VERSION_OF_TARGET[options.target]} for {options.target}")
    expected_compute = {"fp16"} if options.precision == "fp16" else {"fp32"}
    if set(report["compute_dtypes"]) != expected_compute:
        problems.append(f"compute dtypes {report['compute_dtypes']}, expected {expected_compute}")
    shape = report["outputs"][0]["shape"] if report["outputs"] else None
    if options.output_type == "logits" and (not shape or shape[2:] != list(input_size)):
        problems.append(f"logits shape {shape}, expected (1, C, {input_size[0]}, {input_size[1]})")
    max_error, min_cosine = expected_weight_error(options)
    if weights["compared"] == 0:
        problems.append("no weight could be read back and compared")
    elif weights["worst_relative_error"] > max_error or weights["min_cosine"] < min_cosine:
        problems.append(f"weights read back differ from PyTorch: worst relative error "
                        f"{weights['worst_relative_error']:.2e} ({weights['worst_tensor']}), "
                        f"min cosine {weights['min_cosine']:.6f}")
    wanted = {"int8": "int8", "palette4": "palettized"}.get(options.weights_stored)
    if wanted and wanted not in report["weight_dtypes"]:
        problems.append(f"no {wanted} weights stored: {report['weight_dtypes']}")
    if math.isnan(weights["worst_relative_error"]):
        problems.append("NaN in the weights read back")
    return problems


# ----------------------------------------------------------------------------- Linux proxy

def proxy_model(model, package: str | Path, input_size=None, calibration=None):
    """The deploy form computing what ``package`` computes, as far as it can be known without
    Core ML: every weight the package stores, read back from it (int8 / palettised / fp16
    values), and for W8A8 packages the same int8 activation quantization (``calibration`` must be
    the set the package was calibrated on; its SHA-256 is checked). Float16 arithmetic itself is
    not simulated: the proxy computes in float32."""
    import torch

    from lrformer_edge.models.deploy import check_input_size, to_deploy

    package = Path(package)
    spec, program = load_program(package)
    report = package_report(package, spec, program)
    metadata = decode_metadata(report.metadata)
    input_size = check_input_size(input_size or package_input_size(report))
    options = metadata.get("coreml_options") or {}
    deployed = to_deploy(model, input_size, fold_mlp_residuals=False).eval()
    aliases = {}
    if options.get("w8a8"):
        from lrformer_edge.backends.coreml.w8a8 import W8A8Settings, quantize_w8a8

        recorded = (metadata.get("calibration_set") or {}).get("sha256")
        if calibration is None or calibration.sha256 != recorded:
            raise ValueError(
                f"{package} is W8A8, calibrated on a set with SHA-256 {recorded}; pass that same "
                f"calibration set (got {calibration.sha256 if calibration else 'none'})")
        deployed = quantize_w8a8(deployed, calibration, W8A8Settings())
        example = torch.zeros(1, 3, *input_size)
        with torch.no_grad():
            aliases = weight_aliases(torch.export.export(deployed, (example,)))
    stored = package_weights(program, {k: _strip_prefix(v) for k, v in aliases.items()})
    loaded = 0
    with torch.no_grad():
        for name, parameter in deployed.named_parameters():
            found = stored.get(export_name("net." + name))
            if found is not None and found[0].size == parameter.numel():
                parameter.copy_(torch.from_numpy(found[0].reshape(parameter.shape)))
                loaded += 1
        for name, buffer in deployed.named_buffers():
            found = stored.get(export_name("net." + name, "b_"))
            if name.endswith(".weight_int8") and found is not None:
                layer = deployed.get_submodule(name.rpartition(".")[0])
                values = torch.from_numpy(found[0].reshape(buffer.shape))
                buffer.copy_(torch.round(values / layer.weight_scale.view(
                    (-1,) + (1,) * (buffer.dim() - 1))).to(torch.int8))
                loaded += 1
    deployed.package_weights_loaded = loaded
    deployed.package_input_size = input_size
    return deployed


def _strip_prefix(placeholder: str) -> str:
    # Aliases found on the bare deploy form lack the adapter's "net" level.
    return "b_net_" + placeholder[2:] if placeholder.startswith("b_") else placeholder


def package_summary(metadata: dict) -> list[str]:
    """What an exported package holds, for the export summary: spec, I/O, compute and weight
    types, the most frequent ops, the weights read back, whether attention is fused."""
    package, weights = metadata["package"], metadata["weights"]
    top = sorted(package["op_counts"].items(), key=lambda kv: -kv[1])[:12]
    fused = package["op_counts"].get("scaled_dot_product_attention", 0)
    return [
        f"package: spec version {package['spec_version']} ({package['target']}), "
        f"inputs {json.dumps(package['inputs'])}, outputs {json.dumps(package['outputs'])}",
        f"compute dtypes {package['compute_dtypes']}; stored weights {package['weight_dtypes']}",
        "ops: " + ", ".join(f"{name} {count}" for name, count in top),
        f"weights read back: {weights['compared']} tensors compared ({weights['by_storage']}), "
        f"worst relative error {weights['worst_relative_error']:.2e}, min cosine "
        f"{weights['min_cosine']:.6f}; {len(weights['not_found'])} merged by the converter into "
        f"the op that follows them (BatchNorm, layer scale)",
        f"attention: {fused} fused scaled_dot_product_attention ops" if fused else
        "attention: decomposed into matmul/softmax (fused attention needs --target iOS18 or "
        "macOS15)",
    ]
