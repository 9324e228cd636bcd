"""Reading a Core ML package without running it (any OS): its inputs, outputs, deployment target,
operations and weights, compared with the PyTorch weights."""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.optional import require
from lrformer_edge.files import artifact_size_bytes


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
    not_found: list[str]  # merged by the converter into an op it could not be traced to
    worst_relative_error: float  # max |package - torch| / max |torch| over compared tensors
    worst_tensor: str
    min_cosine: float
    by_storage: dict[str, int] = field(default_factory=dict)
    folded: int = 0  # of ``compared``: kernels stored times a BatchNorm or layer scale
    # Folded kernels below float16's normal range (e.g. an untrained 1e-6 layer scale): found,
    # not compared.
    subnormal: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


COMPUTE_OPS = {"conv", "linear", "matmul", "scaled_dot_product_attention"}


def load_program(path: Path):
    """(spec, MIL program) of a package on disk: the one read every inspection shares."""
    ct = coremltools_module()
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


def _quantized_kind(op) -> str:
    """"int8", "uint8", "int4"...: the integer type of a linearly quantized weight's data (by its
    MIL type: numpy holds int4 data as int8)."""
    from coremltools.converters.mil.mil import types

    dtypes = {types.builtin_to_string(v.dtype) for v in op.inputs.values()
              if getattr(v, "val", None) is not None and np.asarray(v.val).ndim >= 2}
    integer = sorted(d for d in dtypes if "int" in d)
    return integer[0] if integer else op.op_type


def _weight_ops(operations):
    """(op, storage kind) of every weight tensor (rank >= 2) of the program."""
    parts = _compressed_data_names(operations)
    for op in operations:
        if op.op_type.startswith("constexpr_"):
            if op.op_type == "constexpr_lut_to_dense":
                yield op, "palettized"
                continue
            yield op, _quantized_kind(op)
        elif op.op_type == "const" and op.name not in parts:
            value = op.outputs[0].val
            if value is not None and np.asarray(value).ndim >= 2:
                yield op, str(np.asarray(value).dtype)


def inspect_package(path: str | Path) -> PackageReport:
    """What a package holds, read from disk (works on Linux): spec version, I/O, op histogram,
    compute dtypes, weight storage and metadata."""
    return package_report(Path(path), *load_program(path))


def package_report(path: Path, spec, program) -> PackageReport:
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


# What the converter and the compression passes append to the names of the ops and constants
# they make from a torch.export node (in this order).
WEIGHT_NAME_SUFFIXES = ("_quantized", "_palettized", "_cast_fp16", "_cast_fp32", "_to_fp16",
                        "_to_fp32")
# A folded kernel (weight x BatchNorm or layer scale) whose largest value is below float16's
# normal range holds only a few subnormal steps: compared, it would show any error at all.
FP16_NORMAL_MIN = 2.0 ** -14


def stored_name(name: str) -> str:
    """The torch.export name of a MIL op or constant: ``p_net_..._weight_to_fp16_palettized``
    -> ``p_net_..._weight``, ``conv2d_3_cast_fp16`` -> ``conv2d_3``."""
    for suffix in WEIGHT_NAME_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def package_weights(program, aliases: dict[str, str]) -> dict[str, tuple[np.ndarray, str]]:
    """Weight values by the name torch.export gave them (``p_net_backbone_..._weight``), as
    stored (a folded kernel holds weight x scale: ``layer_map.fold_aliases``)."""
    values = {}
    for op, kind in _weight_ops(list(program.functions["main"].operations)):
        value = op.materialized_val_inference() if op.op_type.startswith("constexpr_") \
            else op.outputs[0].val
        name = stored_name(op.name)
        values[aliases.get(name, name)] = (np.asarray(value, dtype=np.float32), kind)
    return values


def layer_storage(program, consts: Mapping[str, str]) -> dict[str, dict]:
    """Layer -> {"form": how the package stores its weight ("palettized", "int8", "int4",
    "float16"...; "not found" without such a constant), "bytes": what its stored tensors take
    (data, scales, LUTs; not the weight file's 64-byte header and padding per tensor)}, from
    ``consts``: layer -> its MIL const before compression (``layer_map.map_layer_weights``)."""
    stored = {stored_name(op.name): (op, kind)
              for op, kind in _weight_ops(list(program.functions["main"].operations))}
    storage = {}
    for layer, const in consts.items():
        op, kind = stored.get(stored_name(const), (None, "not found"))
        parts = [] if op is None else [op] if op.op_type == "const" else [
            v.op for v in op.inputs.values() if v.op is not None and v.op.op_type == "const"]
        storage[layer] = {"form": kind, "bytes": sum(_const_bytes(part) for part in parts)}
    return storage


def _const_bytes(op) -> int:
    from coremltools.converters.mil.mil import types

    bits = int(re.search(r"\d+", types.builtin_to_string(op.outputs[0].dtype)).group())
    return (int(np.prod(op.outputs[0].shape)) * bits + 7) // 8


def per_channel(scale: np.ndarray, ndim: int) -> np.ndarray:
    """A per-output-channel factor shaped to broadcast over a weight of ``ndim`` dimensions."""
    return np.asarray(scale, dtype=np.float32).reshape((-1,) + (1,) * (ndim - 1))


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


def export_name(name: str, prefix: str = "p_") -> str:
    return prefix + name.replace(".", "_")


def compare_weights(path: str | Path, torch_module, aliases: dict[str, str] | None = None,
                    folds: dict[str, np.ndarray] | None = None) -> WeightComparison:
    """Read every weight back from the package and compare it with ``torch_module``'s (the module
    that was exported: its parameter names are the package's weight names; ``aliases`` from
    ``weight_aliases`` for W8A8 packages and ``layer_map.fold_aliases`` for folded kernels,
    whose ``folds`` give their per-channel scales)."""
    return compare_program_weights(load_program(path)[1], torch_module, aliases, folds)


def compare_program_weights(program, torch_module, aliases: dict[str, str] | None,
                            folds: dict[str, np.ndarray] | None = None) -> WeightComparison:
    folds = folds or {}
    stored = package_weights(program, aliases or {})
    expected = {export_name(name): p.detach().float().numpy()
                for name, p in torch_module.named_parameters() if p.dim() >= 2}
    for name, _ in torch_module.named_buffers():
        if name.endswith(".weight_int8"):  # W8A8 layers hold their weight as int8 + scales
            layer = torch_module.get_submodule(name.rpartition(".")[0])
            expected[export_name(name, "b_")] = \
                layer.dequantized_weight().detach().float().numpy()
    worst, worst_name, min_cosine, compared, missing = 0.0, "", 1.0, 0, []
    by_storage, folded, subnormal = Counter(), 0, []
    for name, reference in expected.items():
        found = stored.get(name)
        if found is None or found[0].size != reference.size:
            missing.append(name)
            continue
        value, kind = found[0].reshape(reference.shape), found[1]
        if name in folds:  # compared as stored: dividing by a tiny scale would magnify rounding
            reference = reference * per_channel(folds[name], reference.ndim)
            if float(np.abs(reference).max()) < FP16_NORMAL_MIN:
                subnormal.append(name)
                continue
            folded += 1
        scale = float(np.abs(reference).max()) or 1.0
        error = float(np.abs(value - reference).max()) / scale
        cosine = float(np.dot(value.ravel(), reference.ravel()) /
                       (np.linalg.norm(value) * np.linalg.norm(reference) + 1e-30))
        compared += 1
        by_storage[kind] += 1
        if error > worst or math.isnan(error):
            worst, worst_name = error, name
        min_cosine = min(min_cosine, cosine)
    return WeightComparison(compared, missing, worst, worst_name, min_cosine, dict(by_storage),
                            folded, subnormal)


def package_input_size(report: PackageReport) -> tuple[int, int]:
    shape = report.inputs[0]["shape"]
    return int(shape[2]), int(shape[3])


# Core ML spec versions of the deployment targets (what a package records).
SPEC_VERSION_OF_TARGET = {"iOS16": 7, "iOS17": 8, "iOS18": 9, "macOS15": 9}


TARGET_OF_SPEC_VERSION = {7: "iOS16", 8: "iOS17", 9: "iOS18/macOS15"}


def coremltools_module():
    import logging

    # At import it logs about its optional scikit-learn/XGBoost converters and the macOS-only
    # prediction libraries; neither matters for conversion.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return require("coremltools", "coreml", "Core ML export")


