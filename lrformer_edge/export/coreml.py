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
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lrformer_edge.export.metadata import artifact_metadata, decode_metadata
from lrformer_edge.export.onnx import ArtifactCheckError, ExportResult
from lrformer_edge.files import (
    artifact_size_bytes,
    check_replaceable_folder,
    default_file_mode,
    staged_directory,
)
from lrformer_edge.runners.base import require

TARGETS = ("iOS16", "iOS17", "iOS18", "macOS15")
PRECISIONS = ("fp16", "fp32")
WEIGHT_MODES = ("float", "int8", "palette4")
OUTPUT_TYPES = ("logits", "labels")
INPUT_TYPES = ("image", "tensor")
INPUT_NAME = "image"
TENSOR_INPUT_NAME = "input"
# Core ML spec versions of the deployment targets (what a package records).
SPEC_VERSION_OF_TARGET = {"iOS16": 7, "iOS17": 8, "iOS18": 9, "macOS15": 9}
TARGET_OF_SPEC_VERSION = {7: "iOS16", 8: "iOS17", 9: "iOS18/macOS15"}
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


def _coremltools():
    import logging

    # At import it logs about its optional scikit-learn/XGBoost converters and the macOS-only
    # prediction libraries; neither matters for conversion.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return require("coremltools", "coreml", "Core ML export")


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

    ct = _coremltools()
    output = check_output_path(output)
    input_size = check_input_size(input_size or model.config.data.native_size)
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
        from lrformer_edge.quant.w8a8 import W8A8Settings, quantize_w8a8

        settings = W8A8Settings()
        deployed = quantize_w8a8(deployed, calibration, settings)
        quantization = {"quantization": settings.as_dict(),
                        "calibration_set": calibration.describe(),
                        "w8a8_layers": deployed.w8a8_layers}
    adapter = _adapter(deployed, model.config.data, options)
    mlmodel, aliases = _convert(ct, adapter, input_size, options)
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
    with staged_directory(output, suffix=".mlpackage") as staged:
        mlmodel.save(str(staged))  # replaces the empty folder with the package
        staged.chmod(default_file_mode() | 0o111)
        spec, program = _load_program(staged)
        report = _package_report(staged, spec, program)
        weights = _compare_weights(program, adapter, aliases)
        result = ExportResult(output, None, time.time() - start, report.op_counts,
                              {**decode_metadata(metadata), "package": report.as_dict(),
                               "weights": weights.as_dict()})
        problems = check_package(result, options, input_size)
        if problems:
            raise ArtifactCheckError(f"{output.name}: " + "; ".join(problems))
    return result


# ----------------------------------------------------------------------------- inspection

@dataclass
class PackageReport:
    spec_version: int
    target: str
    inputs: list[dict]
    outputs: list[dict]
    op_counts: dict[str, int]
    compute_dtypes: dict[str, int]  # dtype of the outputs of compute ops (conv, linear, matmul...)
    weight_dtypes: dict[str, int]  # stored weight tensors by storage kind
    metadata: dict[str, str]
    size_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def fp16_compute(self) -> bool:
        return set(self.compute_dtypes) == {"fp16"}


@dataclass
class WeightComparison:
    compared: int  # PyTorch weight tensors found by name in the package and compared
    not_found: list[str]  # folded into another op by the converter (e.g. BatchNorm into conv)
    worst_relative_error: float  # max |package - torch| / max |torch| over compared tensors
    worst_tensor: str
    min_cosine: float
    by_storage: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


COMPUTE_OPS = {"conv", "linear", "matmul", "scaled_dot_product_attention"}


def _load_program(path: Path):
    """(spec, MIL program) of a package on disk: the one read every inspection shares."""
    ct = _coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise ValueError(f"{path} is not a Core ML package (no Manifest.json)")
    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    if not spec.HasField("mlProgram"):
        raise ValueError(f"{path} is not an ML program (neural-network packages are not supported)")
    return spec, load_mil(spec, spec.specificationVersion, mlmodel.weights_dir)


def _feature(description) -> dict:
    kind = description.type.WhichOneof("Type")
    if kind == "imageType":
        image = description.type.imageType
        color = image.ColorSpace.Name(image.colorSpace)
        return {"name": description.name, "kind": "image", "shape": [1, 3, image.height,
                                                                     image.width],
                "color": color}
    array = description.type.multiArrayType
    return {"name": description.name, "kind": "tensor", "shape": list(array.shape),
            "dtype": array.ArrayDataType.Name(array.dataType).lower()}


def _compressed_data_names(operations) -> set[str]:
    """Consts that only feed constexpr ops: the stored parts (int8 data, scales, LUTs) of
    compressed weights, counted through their constexpr op."""
    names = set()
    for op in operations:
        if op.op_type.startswith("constexpr_"):
            names.update(v.op.name for v in op.inputs.values() if v.op is not None)
    return names


def _weight_ops(operations):
    """(op, storage kind) of every weight tensor (rank >= 2) of the program."""
    parts = _compressed_data_names(operations)
    for op in operations:
        if op.op_type.startswith("constexpr_"):
            if op.op_type == "constexpr_lut_to_dense":
                yield op, "palettized"
                continue
            dtypes = {str(np.asarray(v.val).dtype) for v in op.inputs.values()
                      if getattr(v, "val", None) is not None and np.asarray(v.val).ndim >= 2}
            yield op, "int8" if "int8" in dtypes else ("uint8" if "uint8" in dtypes else op.op_type)
        elif op.op_type == "const" and op.name not in parts:
            value = op.outputs[0].val
            if value is not None and np.asarray(value).ndim >= 2:
                yield op, str(np.asarray(value).dtype)


def inspect_package(path: str | Path) -> PackageReport:
    """What a package holds, read from disk (works on Linux): spec version, I/O, op histogram,
    compute dtypes, weight storage and metadata."""
    return _package_report(Path(path), *_load_program(path))


def _package_report(path: Path, spec, program) -> PackageReport:
    operations = list(program.functions["main"].operations)
    counts = Counter(op.op_type for op in operations)
    compute = Counter()
    for op in operations:
        if op.op_type in COMPUTE_OPS:
            compute[str(op.outputs[0].dtype.__name__)] += 1
    storage = Counter(kind for _, kind in _weight_ops(operations))
    return PackageReport(
        spec_version=spec.specificationVersion,
        target=TARGET_OF_SPEC_VERSION.get(spec.specificationVersion, "unknown"),
        inputs=[_feature(d) for d in spec.description.input],
        outputs=[_feature(d) for d in spec.description.output],
        op_counts=dict(sorted(counts.items())), compute_dtypes=dict(compute),
        weight_dtypes=dict(storage), metadata=dict(spec.description.metadata.userDefined),
        size_bytes=artifact_size_bytes(path))


WEIGHT_NAME_SUFFIXES = ("_quantized", "_palettized", "_cast_fp16", "_to_fp16", "_to_fp32")


def _package_weights(program, aliases: dict[str, str]) -> dict[str, tuple[np.ndarray, str]]:
    """Weight values by the name torch.export gave them (``p_net_backbone_..._weight``)."""
    values = {}
    for op, kind in _weight_ops(list(program.functions["main"].operations)):
        value = op.materialized_val_inference() if op.op_type.startswith("constexpr_") \
            else op.outputs[0].val
        name = op.name
        for suffix in WEIGHT_NAME_SUFFIXES:
            name = name.removesuffix(suffix)
        values[aliases.get(name, name)] = (np.asarray(value, dtype=np.float32), kind)
    return values


def weight_aliases(exported_program) -> dict[str, str]:
    """Graph node -> placeholder name for ops that read a weight: the MIL ops of W8A8's
    ``dequantize_per_channel`` nodes are named after the node, not the int8 buffer."""
    aliases = {}
    for node in exported_program.graph.nodes:
        if node.op == "call_function" and "dequantize_per_channel" in str(node.target):
            source = node.args[0]
            if getattr(source, "op", None) == "placeholder":
                aliases[node.name] = source.name
    return aliases


def _export_name(name: str, prefix: str = "p_") -> str:
    return prefix + name.replace(".", "_")


def compare_weights(path: str | Path, torch_module, aliases: dict[str, str] | None = None
                    ) -> WeightComparison:
    """Read every weight back from the package and compare it with ``torch_module``'s (the module
    that was exported: its parameter names are the package's weight names; ``aliases`` from
    ``weight_aliases`` for W8A8 packages)."""
    return _compare_weights(_load_program(path)[1], torch_module, aliases)


def _compare_weights(program, torch_module, aliases: dict[str, str] | None) -> WeightComparison:
    stored = _package_weights(program, aliases or {})
    expected = {_export_name(name): p.detach().float().numpy()
                for name, p in torch_module.named_parameters() if p.dim() >= 2}
    for name, _ in torch_module.named_buffers():
        if name.endswith(".weight_int8"):  # W8A8 layers hold their weight as int8 + scales
            layer = torch_module.get_submodule(name.rpartition(".")[0])
            expected[_export_name(name, "b_")] = \
                layer.dequantized_weight().detach().float().numpy()
    worst, worst_name, min_cosine, compared, missing = 0.0, "", 1.0, 0, []
    by_storage = Counter()
    for name, reference in expected.items():
        found = stored.get(name)
        if found is None or found[0].size != reference.size:
            missing.append(name)
            continue
        value, kind = found[0].reshape(reference.shape), found[1]
        scale = float(np.abs(reference).max()) or 1.0
        error = float(np.abs(value - reference).max()) / scale
        cosine = float(np.dot(value.ravel(), reference.ravel()) /
                       (np.linalg.norm(value) * np.linalg.norm(reference) + 1e-30))
        compared += 1
        by_storage[kind] += 1
        if error > worst or math.isnan(error):
            worst, worst_name = error, name
        min_cosine = min(min_cosine, cosine)
    return WeightComparison(compared, missing, worst, worst_name, min_cosine, dict(by_storage))


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
    spec, program = _load_program(package)
    report = _package_report(package, spec, program)
    metadata = decode_metadata(report.metadata)
    input_size = check_input_size(input_size or _input_size(report))
    options = metadata.get("coreml_options") or {}
    deployed = to_deploy(model, input_size, fold_mlp_residuals=False).eval()
    aliases = {}
    if options.get("w8a8"):
        from lrformer_edge.quant.w8a8 import W8A8Settings, quantize_w8a8

        recorded = (metadata.get("calibration_set") or {}).get("sha256")
        if calibration is None or calibration.sha256 != recorded:
            raise ValueError(
                f"{package} is W8A8, calibrated on a set with SHA-256 {recorded}; pass that same "
                f"calibration set (got {calibration.sha256 if calibration else 'none'})")
        deployed = quantize_w8a8(deployed, calibration, W8A8Settings())
        example = torch.zeros(1, 3, *input_size)
        with torch.no_grad():
            aliases = weight_aliases(torch.export.export(deployed, (example,)))
    stored = _package_weights(program, {k: _strip_prefix(v) for k, v in aliases.items()})
    loaded = 0
    with torch.no_grad():
        for name, parameter in deployed.named_parameters():
            found = stored.get(_export_name("net." + name))
            if found is not None and found[0].size == parameter.numel():
                parameter.copy_(torch.from_numpy(found[0].reshape(parameter.shape)))
                loaded += 1
        for name, buffer in deployed.named_buffers():
            found = stored.get(_export_name("net." + name, "b_"))
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


def proxy_accuracy(model, package: str | Path, images: int = 20, calibration=None) -> dict:
    """mIoU of the PyTorch proxy of ``package`` and of the FP32 ``model`` on ``images`` held-out
    procedural scenes, with their pixel agreement (``evaluation.against_ground_truth``)."""
    from lrformer_edge.evaluation import against_ground_truth, procedural_validation_samples
    from lrformer_edge.pipeline import SegmentationPipeline

    proxy = proxy_model(model, package, calibration=calibration)
    size = proxy.package_input_size
    samples = procedural_validation_samples(images)
    result = against_ground_truth(model, SegmentationPipeline.from_model(proxy, size), samples,
                                  size)
    return {"images": result["images"], "fp32_mIoU": result["reference_mIoU"],
            "proxy_mIoU": result["mIoU"], "pixel_agreement": result["pixel_agreement"],
            "weights_read_back": proxy.package_weights_loaded}


def _input_size(report: PackageReport) -> tuple[int, int]:
    shape = report.inputs[0]["shape"]
    return int(shape[2]), int(shape[3])
