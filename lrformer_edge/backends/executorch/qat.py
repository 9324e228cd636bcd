"""ExecuTorch INT8 program (XNNPACK) of a QAT model: ``calibration/qat.py --target executorch``.

NNCF's QAT model is the deploy form with fake-quantize hooks: symmetric per-channel int8 weights
and per-tensor int8 activations on the *inputs* of the convolutions, linears and matmuls; their
outputs, and everything between (residual adds, GELU, BatchNorm, the LayerNorm reductions), stay
float. OpenVINO and TensorRT run that form as it is. XNNPACK cannot: its static int8 convolution
and linear (qs8 activations, qc8 weights) produce an int8 output, so ExecuTorch's partitioner
takes a quantized op only in PT2E's pattern ``dequantize(x) -> op(dequantize(int8 weight))
[-> relu] -> quantize``. Lowered as NNCF left it, the partitioner refuses 67 of the 68 quantized
convolutions/linears of lrformer-test (51: "Expected output node to have a dequantized node",
12: "Expected act input to be dequant node", 4: "Expected quantized node to have a single
output"), and the lowering then stops in XNNPACK's ``ConvertToLinearPass`` ("t() expects a
tensor with <= 2 dimensions, but self is 3D").

So the export puts the model in that pattern, exactly where it can, with one addition where it
cannot (``xnnpack_int8_module``):

1. NNCF's quantizers become PT2E's ``quantized_decomposed`` Q/DQ pairs with the learned scales
   (an unsigned range is the same grid in int8 with zero point -128); the weights become int8
   constants with their per-channel scales;
2. exact rewrites: a BatchNorm after a quantized convolution folds into its per-channel weight
   scales and bias; an op whose quantized input arrives through reshapes/permutes or a
   concatenation of equally quantized tensors gets that Q/DQ again right at its input (the values
   are on the grid already, so this rounds nothing); every dequantize gets one user;
3. the one change to the arithmetic: each quantized convolution/linear whose output NNCF left
   float gets an int8 output quantizer, with the min/max of that output over the QAT calibration
   set as its range (what PT2E's observers do). The QAT model did not train with it, so the
   program is checked against the QAT model with ``QAT_REQUANTIZED_PARITY``.

Then ``lowering.lower_to_executorch`` shapes and lowers it as the FP32 export; every quantized
convolution/linear must land inside XNNPACK, or nothing is written.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from lrformer_edge.artifacts.metadata import artifact_metadata, decode_metadata
from lrformer_edge.artifacts.optional import require
from lrformer_edge.artifacts.parity import ParityThresholds
from lrformer_edge.artifacts.result import ArtifactCheckError, ExportResult
from lrformer_edge.backends.executorch.export import (
    check_output_path,
    lowering_record,
    op_counts,
    program_description,
    write_checked_program,
)
from lrformer_edge.backends.executorch.format import (
    EXTRA,
    executorch_module,
    export_report,
    fill_metadata,
    metadata_methods,
    reserve_metadata,
)

# QAT_EXPORT_PARITY's cosine: a wrong scale or a lost quantizer lands far below it. The argmax
# bound is lower, for step 3 (an int8 rounding the QAT model does not have) on the random test
# models, whose logits nearly tie. Measured, the .pte in ExecuTorch against its QAT model:
# lrformer-test at 64x64, cosine 0.9994, argmax agreement 95.6%; the bundled LRFormer-T at
# 256x256 (NNCF's PTQ start, 7 procedural scenes), cosine 0.9988-0.9994, agreement 99.4-99.6%.
QAT_REQUANTIZED_PARITY = ParityThresholds(max_abs=float("inf"), min_cosine=0.995,
                                          min_pixel_agreement=0.9)
INT8 = (-128, 127)


def quantizer_rules(nncf) -> dict:
    """What XNNPACK's int8 needs of NNCF: per-tensor activation scales (NNCF's default hardware
    config quantizes the inputs of depthwise convolutions per channel)."""
    return {"activations_quantization_params":
            nncf.quantization.advanced_parameters.QuantizationParameters(per_channel=False)}


def export_qat_executorch(quantized, payload: dict, output: str | Path, feed: np.ndarray,
                          log: Callable[[str], None] = print) -> ExportResult:
    """INT8 ``.pte`` of a QAT model, checked in ExecuTorch's runtime against the fake-quant model.

    ``payload`` is its checkpoint as ``lrformer_edge.quant.qat.restore`` returns it (QAT settings
    under ``"quantization"``, the calibration set under ``"calibration_set"``); ``feed`` a
    (1, 3, H, W) batch at its input size."""
    executorch_module("executorch.exir", "ExecuTorch export")
    output = check_output_path(output)
    input_size = tuple(payload["input_size"])
    start = time.time()
    quantized.eval()
    module, record = xnnpack_int8_module(quantized, feed, requantization_images(quantized,
                                                                                 payload))
    described = program_description("int8", quantization={**payload["quantization"], **record},
                                    calibration_set=payload.get("calibration_set"))
    reserved = reserve_metadata(artifact_metadata(quantized, input_size, **described))
    from lrformer_edge.backends.executorch.lowering import lower_to_executorch

    lowered = lower_to_executorch(module, input_size, metadata_methods(reserved), log=log)
    check_int8_delegated(lowered, record["int8_ops"])
    metadata = artifact_metadata(quantized, input_size, **described, **lowering_record(lowered))
    buffer = fill_metadata(lowered.buffer, reserved, metadata)
    for line in export_report(decode_metadata(metadata)):
        log(line)
    agreement = write_checked_program(output, buffer, quantized, feed, QAT_REQUANTIZED_PARITY,
                                      f"{output.name} vs the QAT model")
    return ExportResult(output, agreement, time.time() - start, op_counts(lowered),
                        decode_metadata(metadata))


def requantization_images(quantized, payload: dict) -> list[np.ndarray]:
    """The QAT calibration set (the images NNCF calibrated the QAT starting point with), rebuilt
    from what the checkpoint records and checked against its hash."""
    from lrformer_edge.data.calibration import build_calibration_set

    recorded = payload.get("calibration_set")
    if not recorded:
        raise ValueError("the QAT checkpoint records no calibration set, which the ExecuTorch "
                         "export needs for the output ranges of its int8 ops: run "
                         "calibration/qat.py again")
    calibration = build_calibration_set(recorded["source"], quantized.config.data,
                                        tuple(payload["input_size"]), recorded["images"],
                                        recorded["seed"])
    if calibration.sha256 != recorded["sha256"]:
        raise ValueError(f"the QAT calibration set from {recorded['source']} has changed since "
                         f"QAT (hash {calibration.sha256[:16]}..., recorded "
                         f"{recorded['sha256'][:16]}...): export from the same data")
    return calibration.batches


def check_int8_delegated(lowered, int8_ops: int) -> None:
    """Every quantized convolution/linear must run in XNNPACK: on portable kernels it would
    dequantize its weights on every call, far slower than FP32."""
    inside = lowered.delegated_ops.get("quantized_decomposed.dequantize_per_channel", 0)
    if inside != int8_ops:
        outside = {op: count for op, count in lowered.portable_ops.items()
                   if op.startswith("quantized_decomposed") or op.endswith(
                       ("convolution", "linear"))}
        raise ArtifactCheckError(f"{int8_ops - inside} of {int8_ops} int8 convolutions/linears "
                                 f"stayed outside XNNPACK (portable: {outside})")


# ----------------------------------------------------------------------------- the graph
def xnnpack_int8_module(quantized, feed: np.ndarray, images: list[np.ndarray]):
    """(GraphModule in XNNPACK's PT2E int8 form, what was done to it for the metadata)."""
    with torch.no_grad():
        module = pt2e_graph(quantized, torch.from_numpy(feed))
        record = {"int8_ops": len(_quantized_gemms(module)),
                  "batch_norms_folded": fold_batch_norms(module),
                  "inputs_requantized": quantize_gemm_inputs(module)}
        record["outputs_requantized"] = requantize_gemm_outputs(
            module, [torch.from_numpy(image) for image in images])
        private_dequantizes(module)
    record["xnnpack_form"] = (f"NNCF's quantizers as PT2E Q/DQ; int8 outputs of "
                              f"{record['outputs_requantized']} convolutions/linears added, "
                              f"their ranges the min/max over the QAT calibration set")
    record["format"] = "Q/DQ, int8 (activations with zero points), per-channel symmetric weights"
    return module, record


def pt2e_graph(quantized, example):
    """The exported fake-quant model with NNCF's quantizers as ``quantized_decomposed`` Q/DQ
    pairs, the weights folded to int8 constants."""
    nncf = require("nncf", "qat", "exporting a QAT model")
    stripped = nncf.strip(quantized, do_copy=True, example_input=example)
    if not _with_pt2e_quantizers(stripped):
        raise ValueError("the QAT model holds no quantizers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about NNCF's hooks
        module = torch.export.export(stripped, (example,), strict=False).module()
    return int8_weights(module)


def int8_weights(module):
    """Fold each quantize of a constant (a weight) into an int8 constant, as PT2E's convert."""
    import logging

    require("torchao", EXTRA, "exporting a QAT model")
    logging.getLogger("torchao").setLevel(logging.ERROR)  # GPU-kernel chatter on CPU hosts
    from torchao.quantization.pt2e.constant_fold import constant_fold

    constant_fold(module, lambda node: node.target in _quantize_ops())
    if any(_is_call(node, _ops().quantize_per_channel.default) for node in module.graph.nodes):
        raise ValueError("the QAT model quantizes activations per channel; XNNPACK takes "
                         "per-tensor activation scales only: train it with --target executorch")
    _drop_unused_attributes(module)
    return module


def _ops():
    return torch.ops.quantized_decomposed


def _quantize_ops():
    return (_ops().quantize_per_tensor.default, _ops().quantize_per_channel.default)


def _with_pt2e_quantizers(stripped) -> int:
    """Replace every quantizer hook by its Q/DQ pair; returns how many quantizers there were.

    The torch ``FakeQuantize`` modules that ``nncf.strip`` makes do not export: their forward
    branches on a buffer's value ("Could not guard on data-dependent expression Eq(u0, 1)").
    And ``nncf.strip`` converts a quantizer that several hooks share (the unified scales of a
    concatenation) at its first hook only, so every hook is visited here."""
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseQuantizer
    from nncf.torch.quantization.strip import convert_to_torch_fakequantizer
    from torch.ao.quantization import FakeQuantize

    storage = get_hook_storage(stripped)
    pairs: dict[int, object] = {}
    for name, hook in list(storage.named_hooks(remove_duplicate=False)):
        if isinstance(hook, BaseQuantizer):
            fake_quantize = convert_to_torch_fakequantizer(hook)
        elif isinstance(hook, FakeQuantize):
            fake_quantize = hook
        else:
            continue
        if id(hook) not in pairs:
            pairs[id(hook)] = _QuantizeDequantize(fake_quantize)
        storage.set_submodule(name, pairs[id(hook)])
    return len(pairs)


class _QuantizeDequantize(nn.Module):
    """A torch ``FakeQuantize`` as PT2E's int8 quantize -> dequantize (the same numbers)."""

    def __init__(self, fake_quantize):
        super().__init__()
        low, high = int(fake_quantize.quant_min), int(fake_quantize.quant_max)
        zero_point = fake_quantize.zero_point.detach().to(torch.int64).flatten()
        if low == 0:  # an unsigned range: the same grid in int8, 128 lower
            low, high, zero_point = low - 128, high - 128, zero_point - 128
        if low < INT8[0] or high > INT8[1]:
            raise ValueError(f"a QAT quantizer has the range [{low}, {high}]; XNNPACK takes "
                             f"8-bit quantizers only")
        self.bounds = (low, high)
        self.per_channel = fake_quantize.qscheme in (torch.per_channel_symmetric,
                                                     torch.per_channel_affine)
        scale = fake_quantize.scale.detach().float().flatten()
        if self.per_channel:
            self.axis = int(fake_quantize.ch_axis)
            self.register_buffer("scale", scale.clone())
            self.register_buffer("zero_point", zero_point.clone())
        else:
            self.scale, self.zero_point = float(scale), int(zero_point)

    def forward(self, x):
        ops = torch.ops.quantized_decomposed
        if self.per_channel:
            args = (self.scale, self.zero_point, self.axis, *self.bounds, torch.int8)
            return ops.dequantize_per_channel.default(ops.quantize_per_channel.default(x, *args),
                                                      *args)
        args = (self.scale, self.zero_point, *self.bounds, torch.int8)
        return ops.dequantize_per_tensor.default(ops.quantize_per_tensor.default(x, *args),
                                                 *args)


def _drop_unused_attributes(module) -> None:
    """The float weights the int8 constants replaced (else they would be exported too)."""
    used = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
        if name not in used:
            owner, _, attribute = name.rpartition(".")
            delattr(module.get_submodule(owner), attribute)


# ----------------------------------------------------------------------------- rewrites
def _aten():
    return torch.ops.aten


def _is_call(node, *targets) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target in targets


def _is_dequantize(node) -> bool:
    return _is_call(node, _ops().dequantize_per_tensor.default,
                    _ops().dequantize_per_channel.default)


def _quantized_gemms(module) -> list:
    """Convolutions and linears with an int8 weight constant."""
    return [node for node in module.graph.nodes
            if _is_call(node, _aten().conv2d.default, _aten().linear.default)
            and _is_dequantize(node.args[1]) and node.args[1].args[0].op == "get_attr"]


def _attribute(module, node) -> torch.Tensor:
    owner, _, name = node.target.rpartition(".")
    return getattr(module.get_submodule(owner), name)


def _set_constant(module, node, value) -> None:
    owner, _, name = node.target.rpartition(".")
    parent = module.get_submodule(owner)
    delattr(parent, name)
    parent.register_buffer(name, value.detach().contiguous())


def _new_constant(module, graph, value, stem: str):
    index = 0
    while hasattr(module, f"{stem}{index}"):
        index += 1
    module.register_buffer(f"{stem}{index}", value.detach().contiguous())
    return graph.get_attr(f"{stem}{index}")


def fold_batch_norms(module) -> int:
    """Fold each inference BatchNorm that follows a quantized convolution into its per-channel
    weight scales and bias: BN(conv(x, q * s) + b) = conv(x, sign(f) q * |f| s) + (b - mean) f
    + beta with f = gamma / sqrt(var + eps). Exact, except for a weight at -128 whose sign would
    flip (that BatchNorm stays)."""
    graph, folded = module.graph, 0
    gemms = set(_quantized_gemms(module))
    for norm in list(graph.nodes):
        if not _is_call(norm, _aten().batch_norm.default):
            continue
        conv = norm.args[0]
        if conv not in gemms or conv.target != _aten().conv2d.default \
                or len(conv.users) != 1 or norm.args[5]:  # training-mode statistics
            continue
        weight_dq = conv.args[1]
        if weight_dq.target != _ops().dequantize_per_channel.default or weight_dq.args[3] != 0:
            continue
        int8, scale_node = weight_dq.args[0], weight_dq.args[1]
        mean, var = (_attribute(module, node) for node in norm.args[3:5])
        gamma = _attribute(module, norm.args[1]) if norm.args[1] is not None else \
            torch.ones_like(mean)
        beta = _attribute(module, norm.args[2]) if norm.args[2] is not None else \
            torch.zeros_like(mean)
        factor = gamma / torch.sqrt(var + norm.args[7])
        values = _attribute(module, int8)
        sign = torch.where(factor < 0, -1, 1).to(torch.int16).view(-1, *[1] * (values.dim() - 1))
        if ((values == INT8[0]) & (sign < 0)).any():
            continue
        bias = _attribute(module, conv.args[2]) if len(conv.args) > 2 and \
            conv.args[2] is not None else torch.zeros_like(mean)
        _set_constant(module, int8, (values.to(torch.int16) * sign).to(torch.int8))
        _set_constant(module, scale_node, _attribute(module, scale_node) * factor.abs())
        with graph.inserting_before(conv):
            new_bias = _new_constant(module, graph, (bias - mean) * factor + beta,
                                     "_folded_norm_bias")
        conv.args = (*conv.args[:2], new_bias, *conv.args[3:])
        norm.replace_all_uses_with(conv)
        graph.erase_node(norm)
        folded += 1
    graph.eliminate_dead_code()
    module.recompile()
    return folded


def _moves_data_only(node) -> bool:
    aten = _aten()
    return _is_call(node, aten.permute.default, aten.reshape.default, aten.view.default,
                    aten.transpose.int, aten.flatten.using_ints)


def _grid_of(node):
    """The dequantize whose grid the values of ``node`` lie on: through data movement, and
    through a concatenation whose inputs all share one grid; None if there is none."""
    while _moves_data_only(node):
        node = node.args[0]
    if _is_call(node, _ops().dequantize_per_tensor.default):
        return node
    if _is_call(node, _aten().cat.default):
        grids = [_grid_of(part) for part in node.args[0]]
        if all(grids) and len({tuple(grid.args[1:]) for grid in grids}) == 1:
            return grids[0]
    return None


def quantize_gemm_inputs(module) -> int:
    """Give each quantized convolution/linear whose input is not a dequantize a Q/DQ right at its
    input, with the grid its values already lie on; returns how many."""
    graph, added = module.graph, 0
    for gemm in _quantized_gemms(module):
        source = gemm.args[0]
        if _is_dequantize(source):
            continue
        grid = _grid_of(source)
        if grid is None:
            continue  # not on a grid: XNNPACK will refuse the op, which the export then reports
        with graph.inserting_before(gemm):
            quantize = graph.call_function(_ops().quantize_per_tensor.default,
                                           (source, *grid.args[1:]))
            dequantize = graph.call_function(_ops().dequantize_per_tensor.default,
                                             (quantize, *grid.args[1:]))
        gemm.replace_input_with(source, dequantize)
        added += 1
    module.recompile()
    return added


def _output_of(gemm):
    """The node XNNPACK fuses into the op's output: a ReLU/Hardtanh that is its only user."""
    users = list(gemm.users)
    if len(users) == 1 and _is_call(users[0], _aten().relu.default, _aten().hardtanh.default):
        return users[0]
    return gemm


def requantize_gemm_outputs(module, images) -> int:
    """Quantize the float output of every quantized convolution/linear to int8 (asymmetric, the
    min/max of that output over ``images``); returns how many."""
    graph = module.graph
    outputs = [_output_of(gemm) for gemm in _quantized_gemms(module)]
    outputs = [node for node in outputs if not (
        len(node.users) == 1 and _is_call(next(iter(node.users)),
                                          _ops().quantize_per_tensor.default))]
    ranges = _observed_ranges(module, outputs, images)
    for node in outputs:
        low, high = ranges[node]
        scale = max((high - low) / (INT8[1] - INT8[0]), torch.finfo(torch.float32).eps)
        zero_point = int(min(max(round(INT8[0] - low / scale), INT8[0]), INT8[1]))
        args = (scale, zero_point, *INT8, torch.int8)
        users = list(node.users)
        with graph.inserting_after(node):
            quantize = graph.call_function(_ops().quantize_per_tensor.default, (node, *args))
        with graph.inserting_after(quantize):
            dequantize = graph.call_function(_ops().dequantize_per_tensor.default,
                                             (quantize, *args))
        for user in users:
            user.replace_input_with(node, dequantize)
    graph.lint()
    module.recompile()
    return len(outputs)


def _observed_ranges(module, nodes, images) -> dict:
    """(min, max) of each of ``nodes`` over ``images``, widened to include 0 (int8 represents 0
    exactly, as the padding of the next convolution needs)."""
    watched = set(nodes)
    ranges = {node: (0.0, 0.0) for node in nodes}

    class Observer(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node in watched:
                low, high = ranges[node]
                ranges[node] = (min(low, value.min().item()), max(high, value.max().item()))
            return value

    for image in images:
        Observer(module).run(image)
    return ranges


def private_dequantizes(module) -> int:
    """One dequantize per user (PT2E's form: the partitioner groups a shared one's users into
    one partition, which makes a cycle where a path between them leaves it)."""
    graph, copies = module.graph, 0
    for node in list(graph.nodes):
        if _is_dequantize(node) and len(node.users) > 1:
            for user in list(node.users)[1:]:
                with graph.inserting_after(node):
                    copy = graph.node_copy(node)
                user.replace_input_with(node, copy)
                copies += 1
    graph.lint()
    module.recompile()
    return copies
