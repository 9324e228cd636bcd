"""Which weight of a Core ML program belongs to which layer of the model: the one mapping from
module names (``models/layers.py``) to MIL constants that precision configs, the package checks
and the Linux proxy use.

Most layer weights keep the name torch.export gave them (``p_net_<module>_weight``, plus a
``_to_fp16`` cast suffix). The converter renames the kernels it folds a per-output-channel scale
into: a BatchNorm after a convolution (the stem, the decoder's squeezes) and the layer scale after
an MLP's ``fc2`` (backbone stages 3-4, the decoder's fuse blocks). Those constants are found
through the op that consumes them, which carries the name of the last torch.export node it
fused (``_native_batch_norm_legit_no_training_3``, ``mul_20``), traced back to its convolution.
A folded kernel holds ``weight * scale``; ``fold_scale`` gives the scale, so its stored values
can be compared with the PyTorch weight and read back into it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lrformer_edge.backends.coreml.inspect import export_name, stored_name

WEIGHT_OPS = ("conv", "linear")
LAYER_NODES = ("aten.conv2d", "aten.linear", "aten.convolution")
BATCH_NORM_NODES = ("_native_batch_norm_legit_no_training", "batch_norm")
# Nodes a layer scale passes through before it multiplies the output (shape changes only).
RESHAPE_NODES = ("unsqueeze", "view", "reshape", "expand", "_unsafe_view")
PACKAGE_PREFIX = "net."  # the export adapter's attribute that holds the deploy form


@dataclass(frozen=True)
class LayerWeight:
    """Where a layer's weight is in a converted program."""

    const: str  # name of the MIL const op that holds it (before compression)
    # The BatchNorm module or layer-scale parameter (deploy-form name) folded into it, if any.
    fold: str | None = None

    def as_dict(self) -> dict:
        return {"const": self.const, "fold": self.fold}


def weight_placeholder(layer: str) -> str:
    """torch.export's placeholder of a layer's weight in the adapter (``p_net_..._weight``)."""
    return export_name(PACKAGE_PREFIX + layer + ".weight")


def map_layer_weights(exported_program, mil_program, layers: Iterable) -> dict[str, LayerWeight]:
    """Layer name -> its weight in ``mil_program`` (converted from ``exported_program``, the
    export adapter's), for every layer of ``layers`` (``quantizable_layers`` of the deploy form).
    Raises ValueError naming the layers it cannot find: a config naming them would silently
    leave them at the converter's default."""
    layers = list(layers)
    by_placeholder = {weight_placeholder(layer.name): layer.name for layer in layers}
    nodes = {node.name: node for node in exported_program.graph.nodes}
    parameters = dict(exported_program.graph_signature.inputs_to_parameters)
    found: dict[str, LayerWeight] = {}
    for op in mil_program.functions["main"].operations:
        if op.op_type not in WEIGHT_OPS or op.inputs.get("weight") is None:
            continue
        const = op.inputs["weight"].op
        if const is None or const.op_type != "const":
            continue
        layer = by_placeholder.get(stored_name(const.name))
        fold = None
        if layer is None:
            layer, fold = _trace_fold(nodes.get(stored_name(op.name)), parameters,
                                      by_placeholder)
        if layer is None:
            continue
        mapped = LayerWeight(const.name, fold)
        if found.setdefault(layer, mapped) != mapped:
            raise ValueError(f"layer {layer} has two weights in the Core ML program: "
                             f"{found[layer].const} and {const.name}")
    missing = [layer.name for layer in layers if layer.name not in found]
    if missing:
        more = " ..." if len(missing) > 4 else ""
        raise ValueError(f"{len(missing)} layer(s) have no weight the Core ML program can be "
                         f"seen to use: {', '.join(missing[:4])}{more}")
    return {layer.name: found[layer.name] for layer in layers}


def _trace_fold(node, parameters: Mapping[str, str], by_placeholder: Mapping[str, str]):
    """(layer, fold) for the node a fused conv was named after: a BatchNorm or a multiplication
    by a parameter, directly after a layer; (None, None) for anything else."""
    if node is None or node.op != "call_function":
        return None, None
    target = str(node.target)
    args = [arg for arg in node.args if hasattr(arg, "op")]
    if any(name in target for name in BATCH_NORM_NODES) and len(args) >= 2:
        layer = _layer_of(args[0], by_placeholder)
        scale = parameters.get(args[1].name, "")
        if layer and scale.endswith(".weight"):
            return layer, _deploy_name(scale.removesuffix(".weight"))
    if "aten.mul" in target and len(args) == 2:
        for conv, other in (args, args[::-1]):
            layer = _layer_of(conv, by_placeholder)
            scale = _parameter_behind(other, parameters)
            if layer and scale:
                return layer, _deploy_name(scale)
    return None, None


def _layer_of(node, by_placeholder: Mapping[str, str]) -> str | None:
    if node.op != "call_function" or not any(name in str(node.target) for name in LAYER_NODES):
        return None
    weight = node.args[1] if len(node.args) > 1 else None
    return by_placeholder.get(getattr(weight, "name", None))


def _parameter_behind(node, parameters: Mapping[str, str]) -> str | None:
    """The parameter a node only reshapes (a layer scale broadcast to NCHW), else None."""
    while node.op == "call_function" and any(name in str(node.target) for name in RESHAPE_NODES):
        node = node.args[0]
    return parameters.get(node.name) if node.op == "placeholder" else None


def _deploy_name(adapter_name: str) -> str:
    return adapter_name.removeprefix(PACKAGE_PREFIX)


def fold_scale(deployed, fold: str):
    """The per-output-channel factor the converter multiplied a folded kernel by: a BatchNorm's
    ``weight / sqrt(running_var + eps)``, or the layer-scale parameter itself."""
    import torch
    from torch import nn

    try:
        module = deployed.get_submodule(fold)
    except AttributeError:
        return deployed.get_parameter(fold).detach().float().flatten()
    if not isinstance(module, nn.BatchNorm2d):
        raise ValueError(f"{fold} is folded into a Core ML kernel but is neither a BatchNorm2d "
                         f"nor a parameter")
    return (module.weight / torch.sqrt(module.running_var + module.eps)).detach().float()


def folded_weights(layer_weights: Mapping[str, LayerWeight]) -> dict[str, dict]:
    """What a package records about its folded kernels (metadata ``coreml_folded_weights``):
    layer -> {"const", "fold"}. The other layers' constants follow ``weight_placeholder``."""
    return {layer: weight.as_dict() for layer, weight in layer_weights.items() if weight.fold}


def fold_aliases(folded: Mapping[str, Mapping], deployed) -> tuple[dict, dict]:
    """For reading a package's folded kernels back: (stored const name -> the layer weight's
    placeholder, placeholder -> per-output-channel scale as a float32 array)."""
    aliases, scales = {}, {}
    for layer, record in folded.items():
        placeholder = weight_placeholder(layer)
        aliases[stored_name(record["const"])] = placeholder
        scales[placeholder] = fold_scale(deployed, record["fold"]).numpy()
    return aliases, scales
