"""Where each layer of a precision config (module names, ``models/layers.py``) is in a LiteRT
model: the CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED operators that compute it, and the
ai-edge-quantizer recipe entries that keep those operators float.

The quantizer picks a recipe entry for an operator by ``re.search(entry["regex"], scope)``, the
scope being the operator's output tensor names joined by ";" with a ";" at the end (its
``tfl_flatbuffer_utils.get_op_scope``); a later entry wins over an earlier one. So an operator is
kept float by an entry ``{"regex": "^<its scope, escaped>$", "algorithm_key": "no_quantize"}``
after the INT8 entries.

The scopes are not a guide to the layer, though. litert-torch names a tensor by the call stack of
modules that made it, each module as ``<class>_<last part of its name>`` (its
``backend/debuginfo/_build.py``), and the converter joins the names of fused operations with
";;". ``backbone.block1.0.mlp.fc1`` becomes ``.../DeployBackbone_backbone/
lrformer_edge.models.deploy.DeployBackboneBlock_0/.../DeployInvertedResidualMLP_mlp/
torch.nn.modules.conv.Conv2d_fc1;8``: the ModuleList ``block1`` is gone, so every stage's block
0 reads the same and only the ";8" (the converter's count) tells them apart; ``d_convs1.0`` reads
``DeployBackboneBlock_0/torch.nn.modules.conv.Conv2d_0``, under the block that called it; a
convolution with its BatchNorm and ReLU fused carries those modules' names before its own.

What identifies an operator is its weight. It is matched to the layer whose weight it holds up to
a scale per output channel and one per input channel: the converter folds a BatchNorm that
follows a convolution into the output channels (``ConvBNReLU``, ``patch_embed1.conv1``) and the
affine of a LayerNorm that precedes a linear into its input channels (every ``attn.kv``), and the
folded kernel of a ``ResidualDepthwiseConv2d`` is the deploy form's own weight plus identity
(``backends/layer_names.layer_weight_forms``). A layer that no operator holds, or an operator of a
float layer that holds another layer's weight too, is a ``LayerMappingError`` naming it: a
precision config is never applied to a guessed operator.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from lrformer_edge.backends.layer_names import LayerMappingError, layer_weight_forms
from lrformer_edge.backends.litert.format import litert_module

LAYER_OPERATIONS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
NO_QUANTIZE = "no_quantize"  # ai-edge-quantizer's AlgorithmName.NO_QUANTIZE
# Relative residual of the scaled-weight fit: float32 rounding of the folds leaves ~1e-7,
# another layer's kernel of the same shape ~1. A fit converges in tens of rounds, and after
# three it is below 1e-2 for the weights of one layer, so a worse one is given up there.
_SCALED_MATCH = 1e-4
_FIT_ROUNDS = 50
_HOPELESS_ROUND, _HOPELESS_RESIDUAL = 3, 0.3


@dataclass(frozen=True)
class TfliteOp:
    """An operator of a LiteRT model's main graph that applies a constant weight."""

    index: int  # in the main subgraph's operator list
    operation: str  # CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED
    scope: str  # what ai-edge-quantizer matches a recipe's regex against
    # output-channel-major: (out, in/groups, kh, kw) or (out, in); an operator is its index
    weight: np.ndarray = field(compare=False, repr=False)

    @property
    def regex(self) -> str:
        """The recipe regex that selects this operator and no other."""
        return "^" + re.escape(self.scope) + "$"


def weighted_ops(model: bytes) -> list[TfliteOp]:
    """The convolutions and fully connected operators of ``model``'s main graph whose weight is
    a float constant, in graph order."""
    utils = litert_module("ai_edge_quantizer.utils.tfl_flatbuffer_utils", "LiteRT quantization")
    flatbuffer = utils.read_model(bytearray(model))
    graph = flatbuffer.subgraphs[0]
    ops = []
    for index, op in enumerate(graph.operators):
        name = utils.TFL_OP_CODE_TO_NAME.get(flatbuffer.operatorCodes[op.opcodeIndex].builtinCode)
        operation = getattr(name, "value", "")  # a TFLOperationName, or None for an unknown op
        if operation not in LAYER_OPERATIONS or len(op.inputs) < 2 or op.inputs[1] < 0:
            continue
        tensor = graph.tensors[op.inputs[1]]
        data = utils.get_tensor_data(tensor, flatbuffer.buffers)
        if data is None or data.dtype != np.float32:
            continue
        ops.append(TfliteOp(index, operation, utils.get_op_scope(op, graph.tensors),
                            _output_channel_major(operation, data.reshape(tensor.shape))))
    return ops


def _output_channel_major(operation: str, weight: np.ndarray) -> np.ndarray:
    if operation == "CONV_2D":  # (out, kh, kw, in)
        return weight.transpose(0, 3, 1, 2)
    if operation == "DEPTHWISE_CONV_2D":  # (1, kh, kw, channels)
        return weight.transpose(3, 0, 1, 2)
    return weight  # FULLY_CONNECTED: (out, in)


def layer_ops(model: bytes, deployed, layers: Iterable[str]) -> dict[str, list[TfliteOp]]:
    """{layer: the operators of ``model`` that compute it} for ``layers`` (module names of
    ``deployed``, the deploy form ``model`` was converted from). A shared module (every block of
    a stage calls its ``d_convsN.i``) has several."""
    forms = layer_weight_forms(deployed)
    unknown = [layer for layer in layers if layer not in forms]
    if unknown:
        raise LayerMappingError(f"the LiteRT model's source has no layer {', '.join(unknown)}")
    ops = weighted_ops(model)
    found: dict[str, list[TfliteOp]] = {}
    for layer in layers:
        found[layer] = [op for op in ops if any(_holds(op.weight, w) for w in forms[layer])]
    missing = [layer for layer, held in found.items() if not held]
    if missing:
        raise LayerMappingError(
            f"no operator of the LiteRT model holds the weight of {', '.join(missing)}: the "
            f"model was not converted from this model (or the converter changed a weight in a "
            f"way this mapping does not know)")
    for layer, held in found.items():
        for op in held:
            others = [other for other, weights in forms.items() if other != layer
                      and any(_holds(op.weight, w) for w in weights)]
            if others:
                raise LayerMappingError(
                    f"LiteRT operator {op.index} ({op.operation}) holds the weight of {layer} "
                    f"and of {', '.join(others)}: the model's weights must tell its layers "
                    f"apart")
    return found


def _holds(graph_weight: np.ndarray, weight: np.ndarray) -> bool:
    """Whether ``graph_weight`` is ``weight`` up to a scale per output channel and one per input
    channel (both output-channel-major)."""
    if graph_weight.shape[0] != weight.shape[0] or graph_weight.size != weight.size \
            or graph_weight.shape[1:2] != weight.shape[1:2]:
        return False
    target = graph_weight.reshape(weight.shape[0], weight.shape[1], -1).astype(np.float64)
    source = weight.reshape(target.shape).astype(np.float64)
    norm = np.linalg.norm(target)
    if norm == 0 or not np.linalg.norm(source):
        return False
    rows, columns = np.ones(len(source)), np.ones(source.shape[1])
    for rounds in range(1, _FIT_ROUNDS + 1):  # alternating least squares: rows, then columns
        scaled = source * columns[None, :, None]
        rows = _ratio((target * scaled).sum(axis=(1, 2)), (scaled * scaled).sum(axis=(1, 2)))
        scaled = source * rows[:, None, None]
        columns = _ratio((target * scaled).sum(axis=(0, 2)), (scaled * scaled).sum(axis=(0, 2)))
        residual = np.linalg.norm(target - scaled * columns[None, :, None]) / norm
        if residual <= _SCALED_MATCH:
            return True
        if rounds >= _HOPELESS_ROUND and residual > _HOPELESS_RESIDUAL:
            return False
    return False


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator),
                     where=denominator > 0)


def keep_float_recipe(ops: Iterable[TfliteOp]) -> list[dict]:
    """Recipe entries that keep ``ops`` float (to follow the entries they override)."""
    return [{"regex": op.regex, "operation": op.operation, "algorithm_key": NO_QUANTIZE}
            for op in ops]


def check_recipe_keeps_float(model: bytes, recipe: list[dict],
                             float_ops: Iterable[TfliteOp]) -> None:
    """That ai-edge-quantizer, given ``recipe``, leaves exactly ``float_ops`` of the layer
    operators of ``model`` unquantized (asked of its own recipe manager, scope by scope)."""
    recipes = litert_module("ai_edge_quantizer.recipe_manager", "LiteRT quantization")
    manager = recipes.RecipeManager()
    manager.load_quantization_recipe(recipe)
    wanted = {op.index for op in float_ops}
    kept = {op.index for op in weighted_ops(model)
            if manager.get_quantization_configs(op.operation, op.scope)[0] == NO_QUANTIZE}
    if kept != wanted:
        raise RuntimeError(f"the LiteRT recipe keeps operators {sorted(kept)} float, the "
                           f"precision config asked for {sorted(wanted)}")


def float_ops_of(model: bytes, deployed, float_layers: Iterable[str]) -> \
        Mapping[str, list[TfliteOp]]:
    """``layer_ops`` for a precision config's float layers (empty for none)."""
    float_layers = list(float_layers)
    return layer_ops(model, deployed, float_layers) if float_layers else {}
