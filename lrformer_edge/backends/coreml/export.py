"""Core ML export: an ML program (.mlpackage) of the deploy form, FP16 or FP32 compute, optional
int8 / 4-bit linear / 4-bit palettised weights (for every layer, or layer by layer from a
precision config) or W8A8, with the metadata that lets Xcode preview it as a segmenter.

Path: ``to_deploy`` -> an input adapter (mean/std folded in for image inputs, optional argmax)
-> ``torch.export`` + ``run_decompositions`` -> ``coremltools.convert`` -> each layer's weight
found in the program (``layer_map``) and compressed to its form (``compression``) -> package
written to a temporary folder and renamed. Core ML predicts only on macOS, so on other
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.metadata import artifact_metadata, decode_metadata
from lrformer_edge.artifacts.precision_config import (
    METADATA_KEY,
    PrecisionConfig,
    checked_precision_config,
)
from lrformer_edge.artifacts.result import ArtifactCheckError, ExportResult
from lrformer_edge.artifacts.staging import check_replaceable_folder, staged_directory
from lrformer_edge.backends.coreml.compression import (
    FORM_OF_WEIGHTS,
    INT4_TARGETS,
    WEIGHTS_OF_PRECISION,
    compress,
    expected_forms,
    layer_precisions,
)
from lrformer_edge.backends.coreml.inspect import (
    SPEC_VERSION_OF_TARGET,
    compare_program_weights,
    coremltools_module,
    export_name,
    layer_storage,
    load_program,
    package_input_size,
    package_report,
    package_weights,
    per_channel,
    weight_aliases,
)
from lrformer_edge.backends.coreml.layer_map import (
    fold_aliases,
    folded_weights,
    map_layer_weights,
)
from lrformer_edge.files import default_file_mode
from lrformer_edge.progress import heartbeat
from lrformer_edge.registry import input_size_of

TARGETS = ("iOS16", "iOS17", "iOS18", "macOS15")
PRECISIONS = ("fp16", "fp32")
WEIGHT_MODES = ("float", "int8", "int4", "palette4")
# The precision-config schemes the exporter applies: weight-only, layer by layer (a config of
# scheme int8 stores int8 weights with float activations; W8A8 takes no precision config).
PRECISION_SCHEMES = ("palette4", "weights-int4", "int8")
# Package metadata: the layers whose kernel the converter folded a scale into (layer_map).
FOLDED_WEIGHTS_KEY = "coreml_folded_weights"
OUTPUT_TYPES = ("logits", "labels")
INPUT_TYPES = ("image", "tensor")
INPUT_NAME = "image"
TENSOR_INPUT_NAME = "input"
PREVIEW_TYPE_KEY = "com.apple.coreml.model.preview.type"
PREVIEW_PARAMS_KEY = "com.apple.coreml.model.preview.params"


@dataclass(frozen=True)
class CoreMLOptions:
    precision: str = "fp16"  # compute precision of the ML program
    # float | int8 / int4 (per-channel linear) | palette4 (4-bit k-means LUT): ``compression``
    weights: str = "float"
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
        if self.w8a8 and self.weights not in ("float", "int8"):
            raise ValueError(f"W8A8 stores int8 weights; it cannot be combined with "
                             f"{self.weights} weights (use --weights int8 or float with --w8a8)")
        if self.weights == "int4" and self.target not in INT4_TARGETS:
            raise ValueError(f"int4 weights need Core ML's iOS18 weight format: choose --target "
                             f"{' or '.join(INT4_TARGETS)}")
        if self.w8a8 and self.target == "iOS16":
            raise ValueError("W8A8 needs int8 activation ops, which Core ML has from iOS17: "
                             "choose --target iOS17, iOS18 or macOS15")
        if self.w8a8 and self.precision != "fp16":
            raise ValueError("W8A8 runs its float parts in fp16 on Apple's Neural Engine; "
                             "use --precision fp16 with --w8a8")


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
    return mlmodel, program


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


def checked_options(options: CoreMLOptions, config: PrecisionConfig | None) -> CoreMLOptions:
    """Refuse options that contradict a precision config: its scheme sets the weights."""
    if config is None:
        return options
    if options.w8a8:
        raise ValueError("a precision config sets weight-only compression layer by layer; Core "
                         "ML W8A8 takes none (leave out --w8a8 or the precision config)")
    wanted = WEIGHTS_OF_PRECISION[config.scheme]
    if options.weights != wanted:
        raise ValueError(f"the precision config's scheme {config.scheme} stores {wanted} "
                         f"weights, but {options.weights} weights were asked for: leave the "
                         f"weights option (--weights) out or set it to {wanted}")
    return options


def export_coreml(model, output: str | Path, input_size=None,
                  options: CoreMLOptions = CoreMLOptions(), calibration=None,
                  precision_config: PrecisionConfig | None = None) -> ExportResult:
    """Write ``output`` (.mlpackage) and check it; the result's ``metadata`` holds the package
    report, the weight comparison, each layer's stored form and (W8A8) the proxy model's
    agreement with FP32. ``precision_config``: each layer's weight compression (its scheme must
    be the one ``options.weights`` names); without one every layer gets ``options.weights``."""
    from lrformer_edge.models.deploy import check_input_size, to_deploy
    from lrformer_edge.models.layers import quantizable_layers

    ct = coremltools_module()
    output = check_output_path(output)
    input_size = check_input_size(input_size_of(model, input_size))
    config = checked_precision_config(precision_config, model, input_size, PRECISION_SCHEMES,
                                      "Core ML export")
    options = checked_options(options, config)
    if options.w8a8 and calibration is None:
        raise ValueError("W8A8 needs a calibration set (build_calibration_set(...))")
    if not options.w8a8 and calibration is not None:
        raise ValueError("calibration data applies to W8A8 only")
    start = time.time()
    # Unfolded MLP kernels: folding the identity would cost the fp16 centre taps resolution,
    # and every kernel stays comparable by name with the package (see to_deploy).
    deployed = to_deploy(model, input_size, fold_mlp_residuals=False).eval()
    layers = () if options.w8a8 else quantizable_layers(deployed)
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
        mlmodel, exported = _convert(ct, adapter, input_size, options)
    # W8A8 weights are int8 already (constexpr ops from the Q/DQ graph): nothing to map.
    layer_weights = map_layer_weights(exported, mlmodel._mil_program, layers) if layers else {}
    forms = expected_forms(layers, layer_precisions(layers, options.weights, config),
                           options.target, _float_form(options))
    with heartbeat("Core ML weight compression"):
        mlmodel = compress(mlmodel, forms, {layer: w.const for layer, w in layer_weights.items()},
                           options.target)
    folded = folded_weights(layer_weights)
    metadata = artifact_metadata(
        model, input_size, format="coreml-mlprogram", coreml_options=asdict(options),
        coremltools_version=ct.__version__,
        input_layout=("RGB image 0..255, mean/std applied inside the model"
                      if options.input_type == "image"
                      else "NCHW float32, RGB, (pixel - mean) / std"),
        output=("labels (1, H, W) int32 at input resolution" if options.output_type == "labels"
                else "logits (1, num_classes, H, W) float32 at input resolution"),
        **({FOLDED_WEIGHTS_KEY: folded} if folded else {}),
        **({METADATA_KEY: config.metadata()} if config else {}),
        **quantization)
    _describe(mlmodel, model, input_size, options, metadata)
    aliases, scales = fold_aliases(folded, deployed)
    aliases.update(weight_aliases(exported))
    with staged_directory(output, suffix=".mlpackage") as staged, \
            heartbeat(f"writing and checking {output.name}"):
        mlmodel.save(str(staged))  # replaces the empty folder with the package
        staged.chmod(default_file_mode() | 0o111)
        spec, program = load_program(staged)
        report = package_report(staged, spec, program)
        weights = compare_program_weights(program, adapter, aliases, scales)
        stored = layer_storage(program, {layer: w.const for layer, w in layer_weights.items()})
        result = ExportResult(output, None, time.time() - start, report.op_counts,
                              {**decode_metadata(metadata), "package": report.as_dict(),
                               "weights": weights.as_dict(), "layer_storage": stored})
        problems = check_package(result, options, input_size, forms)
        if problems:
            raise ArtifactCheckError(f"{output.name}: " + "; ".join(problems))
    return result


def _float_form(options: CoreMLOptions) -> str:
    """How the package stores an uncompressed weight (inspect's storage kinds)."""
    return "float16" if options.precision == "fp16" else "float32"


def export_mixed(model, work_dir: str | Path, input_size, precision_config: PrecisionConfig,
                 calibration=None) -> ExportResult:
    """``Backend.export_mixed``: the FP16 package of ``precision_config`` (its scheme's weights,
    layer by layer), named after the variant, scheme and config, in ``work_dir``. Core ML's
    schemes are all weight-only: ``calibration`` (given for int8 schemes) is not used."""
    config = precision_config
    name = f"{model.config.name}-{config.scheme}-mixed-{config.sha256[:12]}.mlpackage"
    options = CoreMLOptions(weights=WEIGHTS_OF_PRECISION[config.scheme])
    return export_coreml(model, Path(work_dir) / name, input_size, options,
                         precision_config=config)


# ----------------------------------------------------------------------------- inspection


def expected_weight_error(weights: str, precision: str) -> tuple[float, float]:
    """(largest relative error, smallest cosine) a faithful package can show for a weight
    stored as ``weights`` (an options' weights, or "w8a8") in a program of ``precision``."""
    if weights == "int8":
        return 0.5 / 127 + 2e-3, 0.999  # half an int8 step (+ fp16 scales)
    if weights == "int4":
        return 0.5 / 7 + 2e-3, 0.98  # half an int4 step
    if weights == "palette4":
        # 16 k-means levels per group: outlying weights sit in wide cells, so only the
        # direction of each tensor is checked. Kernels stored times a layer scale share a LUT
        # among channels of very different scales: LRFormer-T's stage-3 fc2 reach 0.991.
        return math.inf, 0.98
    return (2 ** -10 if precision == "fp16" else 1e-7), 0.99999


def _loosest_weight_error(options: CoreMLOptions, forms: dict[str, str]) -> tuple[float, float]:
    """The tolerance of the coarsest form the package holds (a mixed package: palettes too)."""
    stored = {weights for weights, form in FORM_OF_WEIGHTS.items() if form in forms.values()}
    stored.add("int8" if options.w8a8 else options.weights)  # W8A8 stores int8 weights
    bounds = [expected_weight_error(weights, options.precision) for weights in stored]
    return max(error for error, _ in bounds), min(cosine for _, cosine in bounds)


def check_package(result: ExportResult, options: CoreMLOptions, input_size,
                  forms: dict[str, str] | None = None) -> list[str]:
    """Problems of an exported package against what ``options`` asked for and, layer by layer,
    the stored forms ``forms`` (``compression.expected_forms``) (empty: none)."""
    report, weights = result.metadata["package"], result.metadata["weights"]
    forms = forms or {}
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
    max_error, min_cosine = _loosest_weight_error(options, forms)
    if weights["compared"] == 0:
        problems.append("no weight could be read back and compared")
    elif weights["worst_relative_error"] > max_error or weights["min_cosine"] < min_cosine:
        problems.append(f"weights read back differ from PyTorch: worst relative error "
                        f"{weights['worst_relative_error']:.2e} ({weights['worst_tensor']}), "
                        f"min cosine {weights['min_cosine']:.6f}")
    if options.w8a8 and "int8" not in report["weight_dtypes"]:
        problems.append(f"no int8 weights stored: {report['weight_dtypes']}")
    stored = {layer: entry["form"]
              for layer, entry in (result.metadata.get("layer_storage") or {}).items()}
    wrong = [f"{layer} ({stored.get(layer, 'not found')}, expected {form})"
             for layer, form in forms.items() if stored.get(layer) != form]
    if wrong:
        problems.append(f"{len(wrong)} layer(s) stored in another form than asked: "
                        f"{', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    if math.isnan(weights["worst_relative_error"]):
        problems.append("NaN in the weights read back")
    return problems


# ----------------------------------------------------------------------------- Linux proxy

def proxy_model(model, package: str | Path, input_size=None, calibration=None):
    """The deploy form computing what ``package`` computes, as far as it can be known without
    Core ML: every weight the package stores, read back from it (int8 / int4 / palettised / fp16
    values, layer by layer as a precision config set them; a kernel the converter folded a
    BatchNorm or layer scale into is divided by that scale, so the float BatchNorm or scale
    that follows it in the proxy gives the stored product), and for W8A8 packages the same int8
    activation quantization (``calibration`` must be the set the package was calibrated on; its
    SHA-256 is checked). Float16 arithmetic itself is not simulated: the proxy computes in
    float32."""
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
    aliases = {k: _strip_prefix(v) for k, v in aliases.items()}
    folds, scales = fold_aliases(metadata.get(FOLDED_WEIGHTS_KEY) or {}, deployed)
    stored = package_weights(program, {**aliases, **folds})
    loaded = 0
    with torch.no_grad():
        for name, parameter in deployed.named_parameters():
            placeholder = export_name("net." + name)
            found = stored.get(placeholder)
            if found is not None and found[0].size == parameter.numel():
                value = found[0].reshape(parameter.shape)
                if placeholder in scales:
                    value = _unfolded(value, scales[placeholder], parameter)
                parameter.copy_(torch.from_numpy(value))
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


def _unfolded(stored: np.ndarray, scale: np.ndarray, parameter) -> np.ndarray:
    """A folded kernel divided by its per-channel scale; where the scale is 0 the product is
    0 whatever the weight, and the float weight stays."""
    scale = per_channel(scale, stored.ndim)
    original = parameter.detach().float().numpy()
    return np.where(scale != 0, stored / np.where(scale != 0, scale, 1), original).astype(
        np.float32)


def _strip_prefix(placeholder: str) -> str:
    # Aliases found on the bare deploy form lack the adapter's "net" level.
    return "b_net_" + placeholder[2:] if placeholder.startswith("b_") else placeholder


def package_summary(metadata: dict) -> list[str]:
    """What an exported package holds, for the export summary: spec, I/O, compute and weight
    types, each layer's stored form (and the precision config that set them), the most frequent
    ops, the weights read back, whether attention is fused."""
    package, weights = metadata["package"], metadata["weights"]
    top = sorted(package["op_counts"].items(), key=lambda kv: -kv[1])[:12]
    fused = package["op_counts"].get("scaled_dot_product_attention", 0)
    unmatched = (f"; {len(weights['not_found'])} not found (merged by the converter)"
                 if weights["not_found"] else "")
    subnormal = (f"; {len(weights.get('subnormal', []))} folded kernels below float16's normal "
                 f"range not compared" if weights.get("subnormal") else "")
    return [
        f"package: spec version {package['spec_version']} ({package['target']}), "
        f"inputs {json.dumps(package['inputs'])}, outputs {json.dumps(package['outputs'])}",
        f"compute dtypes {package['compute_dtypes']}; stored weights {package['weight_dtypes']}",
        *_layer_lines(metadata),
        "ops: " + ", ".join(f"{name} {count}" for name, count in top),
        f"weights read back: {weights['compared']} tensors compared ({weights['by_storage']}; "
        f"{weights.get('folded', 0)} with a BatchNorm or layer scale folded in), worst relative "
        f"error {weights['worst_relative_error']:.2e}, min cosine "
        f"{weights['min_cosine']:.6f}{unmatched}{subnormal}",
        f"attention: {fused} fused scaled_dot_product_attention ops" if fused else
        "attention: decomposed into matmul/softmax (fused attention needs --target iOS18 or "
        "macOS15)",
    ]


def _layer_lines(metadata: dict) -> list[str]:
    storage = metadata.get("layer_storage")
    if not storage:
        return []
    counts = Counter(entry["form"] for entry in storage.values())
    stored = sum(entry["bytes"] for entry in storage.values())
    line = (f"layers: {len(storage)}, stored as " + ", ".join(
        f"{form} {count}" for form, count in counts.most_common())
        + f" ({stored / 2**20:.2f} MiB of layer weights)")
    config = metadata.get(METADATA_KEY)
    if config:
        line += (f"; precision config {config['sha256'][:12]}: scheme {config['scheme']}, "
                 f"{len(config['overrides'])} layer(s) raised")
    return [line]
