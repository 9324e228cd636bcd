"""Where each layer of a precision config (``models/layers.py``: module names such as
``backbone.block1.0.attn.q.0``) is in a backend's graph: the names of the Conv / MatMul / Gemm
nodes that compute it, for the backends that quantize an ONNX-derived graph (OpenVINO's
ignored scope, TensorRT's Q/DQ placement and layer precisions).

Node names are not a reliable guide. The TorchScript exporter names nodes by call scope, which
loses modules that are not called (``attn.forward_map`` runs ``attn.q`` as
``/backbone/block1.0/q/q.0/MatMul``), repeats shared modules under each caller
(``backbone.d_convs1.0`` is ``/backbone/block1.0/d_convs1.0/Conv``,
``/backbone/block1.1/d_convs1.0/Conv``, ...) and dedupes others (``patch_embed3.proj`` is
``/backbone/proj_1/Conv``); OpenVINO renames convolutions ``<node>/WithoutBiases``. What survives
every step is the weight, so a node is matched to a layer by, in order:

1. its weight's name: an initializer ``<layer>.weight`` (ONNX keeps the state-dict names of
   weights it uses unchanged);
2. its weight's content, exactly (output-channel-major, so a Linear's transposed MatMul constant
   compares equal), in each form the deploy model gives it: the stored weight, and the folded
   kernel of a ``ResidualDepthwiseConv2d`` (identity added to the centre tap);
3. its weight's content up to a scale per output channel: a convolution with its BatchNorm folded
   in by the exporter (``ConvBNReLU``, ``patch_embed1.conv1``).

The result must be a partition: every weighted node (a Conv, a MatMul with a constant right
operand, a Gemm with a constant B) belongs to exactly one layer, and every layer has at least one
node. MatMuls with a constant *left* operand are the deploy form's adaptive pooling, not layers.
Anything else (a node no layer explains, a layer found nowhere, a content match to two layers) is
a ``LayerMappingError`` naming it: a precision config must never be applied to a guessed node.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Folded BatchNorm: per output channel, graph weight = s * layer weight (s may be negative). The
# exporter computes s * w in float32; 1e-5 of cosine leaves room for that rounding and none for
# another kernel.
PROPORTIONAL_COSINE = 1.0 - 1e-5


class LayerMappingError(ValueError):
    """The layers of a model and the weighted nodes of its graph do not correspond one to one."""


@dataclass(frozen=True)
class WeightedNode:
    """A node of a backend graph that applies a constant weight (a layer candidate)."""

    name: str
    weight: np.ndarray  # output-channel-major: (out, in/groups, kh, kw) or (out, in)
    weight_name: str | None = None  # the weight's name in the graph, where it has one


def layer_weight_forms(model) -> dict[str, list[np.ndarray]]:
    """{layer name: the weights a graph may carry for it} (see the module docstring, step 2), in
    the output-channel-major layout of ``WeightedNode``."""
    from lrformer_edge.models.layers import layer_kind

    forms = {}
    for name, module in model.named_modules():
        if layer_kind(module) is None:
            continue
        weights = [module.weight]
        folded = getattr(module, "folded_weight", None)
        if folded is not None:
            weights.append(folded())
        elif _has_residual_form(module):
            weights.append(_with_identity(module.weight))
        forms[name] = [w.detach().cpu().float().numpy() for w in weights]
    return forms


def _has_residual_form(module) -> bool:
    """A 3x3 depthwise convolution that the deploy form may fold ``x + conv(x)`` into
    (``models/deploy.ResidualDepthwiseConv2d``): the reference model's MLP convolutions."""
    return (module.groups > 1 and module.groups == module.in_channels == module.out_channels
            and tuple(module.kernel_size) == (3, 3) and tuple(module.padding) == (1, 1)
            and tuple(module.stride) == (1, 1)) if hasattr(module, "groups") else False


def _with_identity(weight):
    """The weight the deploy form computes for ``x + conv(x)`` (the same float32 addition)."""
    import torch

    identity = torch.zeros_like(weight)
    identity[:, :, 1, 1] = 1.0
    return weight + identity


def map_layers(model, nodes: Sequence[WeightedNode], graph: str) -> dict[str, list[str]]:
    """{layer name: names of its nodes, in graph order} for every layer of ``model`` (reference
    or deploy form), from the weighted nodes of a graph; ``graph`` names it in errors."""
    forms = layer_weight_forms(model)
    owner: dict[str, str] = {}
    by_weight_name = {f"{layer}.weight": layer for layer in forms}
    for node in nodes:
        if node.weight_name in by_weight_name:
            owner[node.name] = by_weight_name[node.weight_name]
    _match_exact(forms, [n for n in nodes if n.name not in owner], owner, graph)
    _match_proportional(forms, [n for n in nodes if n.name not in owner], owner, graph)
    return _checked_partition(forms, nodes, owner, graph)


def _fingerprint(weight: np.ndarray) -> tuple:
    array = np.ascontiguousarray(weight, dtype=np.float32)
    return array.shape, array.tobytes()


def _match_exact(forms, nodes, owner, graph) -> None:
    index: dict[tuple, set[str]] = {}
    for layer, weights in forms.items():
        for weight in weights:
            index.setdefault(_fingerprint(weight), set()).add(layer)
    for node in nodes:
        layers = index.get(_fingerprint(node.weight), set())
        if len(layers) > 1:
            raise LayerMappingError(f"{graph}: node {node.name} has the weight of "
                                    f"{len(layers)} layers ({', '.join(sorted(layers))}); the "
                                    f"model's weights must tell its layers apart")
        if layers:
            (owner[node.name],) = layers


def _match_proportional(forms, nodes, owner, graph) -> None:
    found = set(owner.values())
    unmatched = [layer for layer in forms if layer not in found]
    for node in nodes:
        layers = [layer for layer in unmatched
                  if any(_proportional_rows(node.weight, w) for w in forms[layer])]
        if len(layers) > 1:
            raise LayerMappingError(f"{graph}: node {node.name} has, up to a scale per output "
                                    f"channel, the weight of {len(layers)} layers "
                                    f"({', '.join(layers)})")
        if layers:
            owner[node.name] = layers[0]


def _proportional_rows(graph_weight: np.ndarray, weight: np.ndarray) -> bool:
    """Whether each output channel of ``graph_weight`` is a (non-zero) multiple of the same
    channel of ``weight``. Channels of one element say nothing (any two are proportional)."""
    if graph_weight.shape != weight.shape or weight[0].size < 2:
        return False
    a = graph_weight.reshape(len(graph_weight), -1).astype(np.float64)
    b = weight.reshape(len(weight), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    if np.any(norms == 0):
        return False
    cosine = np.abs((a * b).sum(axis=1)) / norms
    return bool(np.all(cosine >= PROPORTIONAL_COSINE))


def _checked_partition(forms, nodes, owner, graph) -> dict[str, list[str]]:
    unexplained = [node.name for node in nodes if node.name not in owner]
    if unexplained:
        raise LayerMappingError(
            f"{graph}: {len(unexplained)} weighted node(s) match no layer of the model, e.g. "
            f"{', '.join(unexplained[:3])}: the graph was not exported from this model (or "
            f"its exporter changed a weight in a way this mapping does not know)")
    mapping: dict[str, list[str]] = {layer: [] for layer in forms}
    for node in nodes:
        mapping[owner[node.name]].append(node.name)
    missing = [layer for layer, names in mapping.items() if not names]
    if missing:
        raise LayerMappingError(
            f"{graph}: {len(missing)} layer(s) have no node in the graph, e.g. "
            f"{', '.join(missing[:3])}: the graph was not exported from this model")
    return mapping


def float_layer_nodes(config, layer_nodes: Callable[[], Mapping[str, Sequence[str]]]
                      ) -> dict[str, list[str]]:
    """{float layer of the precision config ``config``: its node names}, from
    ``layer_nodes()`` (a backend's mapping, computed only when ``config`` has float layers;
    empty for None)."""
    if config is None or not config.float_layers:
        return {}
    mapping = layer_nodes()
    unknown = [layer for layer in config.float_layers if layer not in mapping]
    if unknown:
        raise LayerMappingError(f"the graph has no layer {', '.join(unknown[:3])}")
    return {layer: list(mapping[layer]) for layer in config.float_layers}


# --------------------------------------------------------------------------- ONNX graphs
def onnx_weighted_nodes(onnx_model) -> list[WeightedNode]:
    """The Conv, MatMul and Gemm nodes of ``onnx_model`` whose weight is a constant (an
    initializer or a Constant node), in graph order; MatMuls with a constant left operand (the
    adaptive pooling) are not among them."""
    from onnx import numpy_helper

    constants = {init.name: init for init in onnx_model.graph.initializer}
    for node in onnx_model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    nodes = []
    for node in onnx_model.graph.node:
        if len(node.input) < 2 or node.input[1] not in constants:
            continue
        weight = numpy_helper.to_array(constants[node.input[1]])
        if node.op_type == "Conv":
            pass
        elif node.op_type == "MatMul" and weight.ndim == 2 and node.input[0] not in constants:
            weight = weight.T  # (in, out) -> (out, in)
        elif node.op_type == "Gemm" and weight.ndim == 2:
            transposed = any(a.name == "transB" and a.i for a in node.attribute)
            weight = weight if transposed else weight.T
        else:
            continue
        nodes.append(WeightedNode(node.name, weight, node.input[1]))
    return nodes


def onnx_layer_nodes(model, onnx_model) -> dict[str, list[str]]:
    """{layer name: ONNX node names} for every layer of ``model`` (reference or deploy form) in
    ``onnx_model``, its ONNX export (plain, or constant-folded as the TensorRT path does)."""
    return map_layers(model, onnx_weighted_nodes(onnx_model), "the ONNX graph")
