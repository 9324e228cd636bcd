"""Graph rewrites that put the deploy form's hot path inside XNNPACK, with the same arithmetic.

XNNPACK takes convolutions, linears, batched matmuls, softmax, elementwise ops, bilinear resize
and spatial means, but not a mean over channels, a LayerNorm, ``scaled_dot_product_attention``
(its decomposition masks with ``where``/``any``), a matmul broadcasting a constant (``expand``)
or ``split``. Each of those left a hole in the delegate: the plain export of LRFormer-T cut the
graph into 166 XNNPACK partitions with portable kernels (and layout copies) between them, and ran
3.2x slower than PyTorch eager. The rewrites, on the exported module's ATen graph:

* ``fold_constants``: a subgraph of parameters and buffers only (the folded MLP kernel
  ``weight + identity``) becomes one constant, so the convolution has a static weight;
* a mean over the channels of an NCHW map (the deploy form's channel LayerNorm) becomes a 1x1
  convolution with 1/C weights; a LayerNorm over tokens becomes the same reductions as linears;
* attention becomes ``softmax((q @ k^T) * scale) @ v`` in batched matmuls (the official
  formula); a constant-times-map matmul (exact pooling) a batched matmul with a constant batch;
* ``chunk`` becomes slices.

Run ``fold_constants`` before PT2E quantization (a folded kernel is a weight the quantizer can
see) and ``shape_for_xnnpack`` after it (the normalisation and attention statistics stay float).
"""
from __future__ import annotations

import hashlib
import math
import operator

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

aten = torch.ops.aten
_QUANT_NAMESPACES = ("quantized_decomposed", "torchao")


def _is_quant_op(node: fx.Node) -> bool:
    return getattr(node.target, "namespace", "") in _QUANT_NAMESPACES


def _constant_buffer(gm: fx.GraphModule, tensor: torch.Tensor, stem: str) -> str:
    name = stem
    index = 0
    while hasattr(gm, name):
        index += 1
        name = f"{stem}_{index}"
    gm.register_buffer(name, tensor.detach().clone().contiguous())
    return name


def _get_attr(gm: fx.GraphModule, graph: fx.Graph, tensor: torch.Tensor, stem: str) -> fx.Node:
    node = graph.get_attr(_constant_buffer(gm, tensor, stem))
    node.meta["val"] = tensor
    return node


def _attr_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value


def _call(graph: fx.Graph, target, *args, like: fx.Node | None = None) -> fx.Node:
    node = graph.call_function(target, args)
    if like is not None and "val" in like.meta:
        node.meta["val"] = like.meta["val"]
    return node


def _shape(node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def fold_constants(gm: fx.GraphModule) -> int:
    """Evaluate every op whose inputs are all constants into one buffer; returns how many."""
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or _is_quant_op(node) or not node.users:
            continue
        inputs = node.all_input_nodes
        if not inputs or any(arg.op != "get_attr" for arg in inputs):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _attr_value(gm, n))
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor):
            continue
        with gm.graph.inserting_before(node):
            constant = _get_attr(gm, gm.graph, value, "_folded")
        node.replace_all_uses_with(constant)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return folded


def fold_batch_norms(gm: fx.GraphModule) -> int:
    """Eval-mode batch norms into the convolution they follow, else into a per-channel affine
    (``x * scale + shift``); returns how many.

    PT2E's convert re-matches 108 conv/batch-norm training patterns whenever a batch norm is
    left in the graph (about 100 s on 2 cores); with none left it skips them."""
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.batch_norm.default:
            continue
        x, weight, bias, mean, var, training = node.args[:6]
        eps = node.args[7]
        if training or any(arg is None or arg.op != "get_attr" for arg in (weight, bias, mean, var)):
            continue
        weight, bias, mean, var = (_attr_value(gm, arg) for arg in (weight, bias, mean, var))
        scale = weight / torch.sqrt(var + eps)
        shift = bias - mean * scale
        if not _fold_into_conv(gm, node, x, scale, shift):
            _replace_with_affine(gm, node, x, scale, shift)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return folded


def _fold_into_conv(gm, node: fx.Node, conv: fx.Node, scale, shift) -> bool:
    if conv.op != "call_function" or conv.target is not aten.conv2d.default \
            or len(conv.users) != 1 or conv.args[1].op != "get_attr":
        return False
    bias = conv.args[2] if len(conv.args) > 2 else None
    if bias is not None and bias.op != "get_attr":
        return False
    weight = _attr_value(gm, conv.args[1]) * scale[:, None, None, None]
    bias = shift if bias is None else _attr_value(gm, bias) * scale + shift
    graph = gm.graph
    with graph.inserting_before(conv):
        args = list(conv.args) + [None] * (3 - len(conv.args))
        args[1] = _get_attr(gm, graph, weight, "_conv_bn_weight")
        args[2] = _get_attr(gm, graph, bias, "_conv_bn_bias")
    conv.args = tuple(args)
    node.replace_all_uses_with(conv)
    graph.erase_node(node)
    return True


def _replace_with_affine(gm, node: fx.Node, x: fx.Node, scale, shift) -> None:
    graph = gm.graph
    with graph.inserting_before(node):
        scale = _get_attr(gm, graph, scale[:, None, None], "_bn_scale")
        shift = _get_attr(gm, graph, shift[:, None, None], "_bn_shift")
        affine = _call(graph, aten.add.Tensor, _call(graph, aten.mul.Tensor, x, scale), shift,
                       like=node)
    node.replace_all_uses_with(affine)
    graph.erase_node(node)


def _channel_mean_as_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    x, dims = node.args[0], node.args[1]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if len(_shape(x)) != 4 or list(dims) not in ([1], [-3]) or not keepdim:
        return False
    channels = _shape(x)[1]
    graph = gm.graph
    with graph.inserting_before(node):
        weight = _get_attr(gm, graph, torch.full((1, channels, 1, 1), 1.0 / channels),
                           "_channel_mean")
        conv = _call(graph, aten.conv2d.default, x, weight, like=node)
    node.replace_all_uses_with(conv)
    graph.erase_node(node)
    return True


def _layer_norm_as_linears(gm: fx.GraphModule, node: fx.Node) -> bool:
    x, normalized_shape = node.args[0], node.args[1]
    weight = node.args[2] if len(node.args) > 2 else None
    bias = node.args[3] if len(node.args) > 3 else None
    eps = node.args[4] if len(node.args) > 4 else 1e-5
    if len(normalized_shape) != 1:
        return False
    channels = normalized_shape[0]
    graph = gm.graph
    with graph.inserting_before(node):
        averaging = _get_attr(gm, graph, torch.full((1, channels), 1.0 / channels), "_token_mean")
        mean = _call(graph, aten.linear.default, x, averaging)
        centred = _call(graph, aten.sub.Tensor, x, mean, like=node)
        square = _call(graph, aten.mul.Tensor, centred, centred, like=node)
        variance = _call(graph, aten.linear.default, square, averaging)
        std = _call(graph, aten.sqrt.default, _call(graph, aten.add.Tensor, variance, eps))
        out = _call(graph, aten.div.Tensor, centred, std, like=node)
        if weight is not None:
            out = _call(graph, aten.mul.Tensor, out, weight, like=node)
        if bias is not None:
            out = _call(graph, aten.add.Tensor, out, bias, like=node)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _attention_as_bmm(gm: fx.GraphModule, node: fx.Node) -> bool:
    q, k, v = node.args[:3]
    if len(node.args) > 3 or set(node.kwargs) - {"scale"} or len(_shape(q)) != 4:
        return False  # masks, dropout or causal attention are not the deploy form's
    batch, heads, queries, depth = _shape(q)
    keys = _shape(k)[2]
    scale = node.kwargs.get("scale") or 1.0 / math.sqrt(depth)
    graph = gm.graph
    with graph.inserting_before(node):
        q3 = _call(graph, aten.reshape.default, q, [batch * heads, queries, depth])
        k3 = _call(graph, aten.reshape.default, k, [batch * heads, keys, depth])
        v3 = _call(graph, aten.reshape.default, v, [batch * heads, keys, _shape(v)[3]])
        kt = _call(graph, aten.permute.default, k3, [0, 2, 1])
        scores = _call(graph, aten.bmm.default, q3, kt)
        factor = _get_attr(gm, graph, torch.tensor(scale, dtype=torch.float32), "_attn_scale")
        scaled = _call(graph, aten.mul.Tensor, scores, factor)
        probs = _call(graph, aten.softmax.int, scaled, -1)
        out = _call(graph, aten.bmm.default, probs, v3)
        out = _call(graph, aten.reshape.default, out, list(_shape(node)), like=node)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _constant_matmul_as_bmm(gm: fx.GraphModule, node: fx.Node) -> bool:
    left, right = node.args[:2]
    if left.op != "get_attr" or len(_shape(left)) != 2 or len(_shape(right)) != 3:
        return False
    batched = _attr_value(gm, left).unsqueeze(0).expand(_shape(right)[0], -1, -1)
    graph = gm.graph
    with graph.inserting_before(node):
        constant = _get_attr(gm, graph, batched, "_pool_rows")
        bmm = _call(graph, aten.bmm.default, constant, right, like=node)
    node.replace_all_uses_with(bmm)
    graph.erase_node(node)
    return True


def _chunk_as_slices(gm: fx.GraphModule, node: fx.Node) -> bool:
    x, chunks = node.args[:2]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    size = _shape(x)[dim]
    users = list(node.users)
    if size % chunks or any(user.target is not operator.getitem for user in users):
        return False
    step = size // chunks
    graph = gm.graph
    for user in users:
        index = user.args[1]
        with graph.inserting_before(user):
            piece = _call(graph, aten.slice.Tensor, x, dim, index * step, (index + 1) * step,
                          like=user)
        user.replace_all_uses_with(piece)
        graph.erase_node(user)
    graph.erase_node(node)
    return True


_REWRITES = {
    aten.mean.dim: _channel_mean_as_conv,
    aten.layer_norm.default: _layer_norm_as_linears,
    aten.scaled_dot_product_attention.default: _attention_as_bmm,
    aten.matmul.default: _constant_matmul_as_bmm,
    aten.chunk.default: _chunk_as_slices,
}


def share_identical_constants(gm: fx.GraphModule) -> int:
    """Point every constant equal to an earlier one (same dtype, shape and values) at that one,
    and drop the copies; returns how many were dropped.

    The deploy form repeats its constants: every block of a stage has the same pooling matrices,
    every LayerNorm of a width the same averaging weights. LRFormer-T at 512x512 has 843
    constants and 370 distinct ones, and ExecuTorch's passes handle each constant on every
    re-trace (some of it in lookups that grow with the square of their number)."""
    kept: dict[tuple, fx.Node] = {}
    shared = 0
    for node in list(gm.graph.nodes):
        value = _attr_value(gm, node) if node.op == "get_attr" else None
        if not isinstance(value, torch.Tensor):
            continue
        key = (value.dtype, tuple(value.shape), _digest(value))
        first = kept.setdefault(key, node)
        if first is not node and torch.equal(_attr_value(gm, first), value):
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            shared += 1
    _drop_unused_attributes(gm)
    return shared


def _digest(tensor: torch.Tensor) -> bytes:
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha1(raw.cpu().numpy().tobytes()).digest()


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name in [name for name, _ in [*gm.named_parameters(), *gm.named_buffers()]
                 if name not in used]:
        owner_path, _, attribute = name.rpartition(".")
        delattr(gm.get_submodule(owner_path) if owner_path else gm, attribute)


def shape_for_xnnpack(gm: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Apply the rewrites in place; returns how many of each were made. ``example``: inputs
    to record every tensor's shape with (a quantized graph's new nodes carry none)."""
    ShapeProp(gm).propagate(*example)
    made: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        rewrite = _REWRITES.get(node.target) if node.op == "call_function" else None
        if rewrite and rewrite(gm, node):
            made[rewrite.__name__.strip("_")] = made.get(rewrite.__name__.strip("_"), 0) + 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return made
