"""Explicit-quantization (Q/DQ) ONNX for TensorRT: NNCF post-training quantization, then the
form TensorRT 10/11 requires — int8 only, zero-points 0, per-channel weights, per-tensor
activations.

Why NNCF (ONNX backend) rather than NVIDIA ModelOpt: the same quantizer already produces our
OpenVINO INT8 IR and the QAT model (issue 7), so PTQ, QAT and both INT8 targets share one set of
quantizer rules and one calibration set; it runs calibration on the CPU through ONNX Runtime (no
GPU, no CUDA wheels on the export machine); and its TRANSFORMER model type places Q/DQ only in
front of MatMul/Conv/Add inputs — LayerNorm, Softmax and the resizes stay float, as TensorRT's
explicit-quantization guide recommends. What NNCF leaves that TensorRT does not take (uint8
activations after ReLU) is rewritten by ``to_signed_int8``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lrformer_edge.artifacts.optional import require
from lrformer_edge.backends.nncf_statistics import SharedPass, cached_nncf_statistics
from lrformer_edge.backends.nncf_support import FLOAT_POOLING
from lrformer_edge.progress import heartbeat

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Kept in float: numerically sensitive (LayerNorm, Softmax) or pure resampling (final resize).
FLOAT_TYPES = ("LayerNormalization", "Softmax", "Resize")
INT8_RANGE = 127.0
UINT8_RANGE = 255.0


def _nncf():
    import logging

    nncf = require("nncf", "tensorrt", "Q/DQ quantization for TensorRT")
    logging.getLogger("nncf").setLevel(logging.WARNING)  # one INFO line per float op otherwise
    return nncf


def quantization_settings(calibration) -> dict:
    return {"quantization": {
        "tool": f"nncf {_nncf().__version__} (ONNX backend)", "model_type": "TRANSFORMER",
        "preset": "PERFORMANCE", "format": "Q/DQ, int8, zero-point 0",
        "weights": "per-channel symmetric", "activations": "per-tensor symmetric",
        "smooth_quant": False, "float_types": list(FLOAT_TYPES),
        "float_ops": FLOAT_POOLING},
        "calibration_set": calibration.describe()}


def quantizer_rules(nncf) -> dict:
    """What TensorRT's int8 needs of NNCF beyond its defaults (PTQ here, and QAT): NNCF's default
    hardware config quantizes the inputs of depthwise convolutions per channel; TensorRT takes
    per-tensor activation scales only."""
    return {"activations_quantization_params":
            nncf.quantization.advanced_parameters.QuantizationParameters(per_channel=False)}


def quantize_qdq(onnx_model, calibration, statistics_cache=None,
                 float_nodes: Sequence[str] = (), fp32_onnx=None):
    """(Q/DQ onnx.ModelProto in TensorRT form, settings for the artifact metadata).
    ``statistics_cache``: a ``nncf_statistics.StatisticsCache`` (see ``quantize_openvino``).
    ``fp32_onnx``: the path of the FP32 ONNX ``onnx_model`` was folded from; its activations are
    measured by the pass every target shares (``activation_statistics``).
    ``float_nodes``: names of nodes of ``onnx_model`` that get no Q/DQ on their inputs or
    weights (a precision config's float layers); not part of the settings, so the statistics of
    a plain export cover an export with a config."""
    from lrformer_edge.backends.nncf_collectors import onnx_tensor_resolver

    settings = quantization_settings(calibration)
    shared = None if fp32_onnx is None else \
        SharedPass(fp32_onnx, calibration.batches, onnx_tensor_resolver)
    with heartbeat("NNCF INT8 quantization (TensorRT Q/DQ)"), \
            cached_nncf_statistics(statistics_cache, settings["quantization"], shared):
        return to_signed_int8(_quantize(onnx_model, calibration, float_nodes)), settings


def _quantize(onnx_model, calibration, float_nodes=()):
    nncf = _nncf()
    feeds = [{onnx_model.graph.input[0].name: batch} for batch in calibration.batches]
    advanced = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1, convolution=-1),
        **quantizer_rules(nncf))
    quantized = nncf.quantize(
        onnx_model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(feeds),
        ignored_scope=ignored_scope(nncf, onnx_model, float_nodes),
        advanced_parameters=advanced)
    return quantized


def ignored_scope(nncf, onnx_model, float_nodes: Sequence[str] = ()):
    """Float types, pooling MatMuls and ``float_nodes``. Validated when ``float_nodes`` are given
    (the pooling names come from this graph and every LRFormer has the float types, so only a
    wrong float node can fail it)."""
    return nncf.IgnoredScope(names=pooling_matmuls(onnx_model) + list(float_nodes),
                             types=list(FLOAT_TYPES), validate=bool(float_nodes))


def pooling_matmuls(onnx_model) -> list[str]:
    """MatMuls with a constant left operand: the deploy form's exact adaptive pooling, kept in
    float (averaging gains nothing from int8; weights of linear layers are on the right)."""
    constants = set(_initializers(onnx_model))
    constants.update(out for node in onnx_model.graph.node if node.op_type == "Constant"
                     for out in node.output)
    return [node.name for node in onnx_model.graph.node
            if node.op_type == "MatMul" and node.input[0] in constants]


def _initializers(model) -> dict:
    return {init.name: init for init in model.graph.initializer}


def to_signed_int8(model):
    """Rewrite unsigned 8-bit Q/DQ (zero-point 0, non-negative tensors) as signed int8.

    A uint8 quantizer with scale s covers [0, 255 s]; the int8 one covering the same range needs
    scale 255 s / 127 (one bit of resolution is lost on those tensors, which is what TensorRT
    runs anyway). Each node gets its own scale/zero-point so shared initializers are not scaled
    twice. Non-zero zero-points are an error: TensorRT accepts symmetric quantization only.
    """
    from onnx import TensorProto, numpy_helper

    inits = _initializers(model)
    value_types = {info.name: info.type.tensor_type for info in model.graph.value_info}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in QDQ_OPS or len(node.input) < 3:
            continue
        zero_point = inits.get(node.input[2])
        if zero_point is None:
            raise ValueError(f"{node.name}: zero-point is not a constant; TensorRT needs constant "
                             f"Q/DQ parameters")
        values = numpy_helper.to_array(zero_point)
        if np.any(values != 0):
            raise ValueError(f"{node.name}: zero-point {values.ravel()[:4]} is not 0; TensorRT "
                             f"accepts symmetric quantization only")
        if zero_point.data_type != TensorProto.UINT8:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]) * (UINT8_RANGE / INT8_RANGE)
        suffix = f"_int8_{index}"
        model.graph.initializer.extend([
            numpy_helper.from_array(scale.astype(np.float32), node.input[1] + suffix),
            numpy_helper.from_array(np.zeros_like(values, dtype=np.int8), node.input[2] + suffix)])
        node.input[1] += suffix
        node.input[2] += suffix
        if node.op_type == "QuantizeLinear" and node.output[0] in value_types:
            value_types[node.output[0]].elem_type = TensorProto.INT8
    _drop_unused_initializers(model)
    return model


def _drop_unused_initializers(model) -> None:
    used = {name for node in model.graph.node for name in node.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def qdq_problems(model) -> list[str]:
    """Why TensorRT would reject or mis-run these Q/DQ nodes (empty when the form is right)."""
    from onnx import TensorProto, numpy_helper

    inits = _initializers(model)
    problems = []
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        if len(node.input) < 3 or node.input[2] not in inits:
            problems.append(f"{node.name}: no constant zero-point (int8 type cannot be inferred)")
            continue
        zero_point = inits[node.input[2]]
        if zero_point.data_type != TensorProto.INT8:
            problems.append(f"{node.name}: zero-point type "
                            f"{TensorProto.DataType.Name(zero_point.data_type)}, expected INT8")
        if np.any(numpy_helper.to_array(zero_point) != 0):
            problems.append(f"{node.name}: non-zero zero-point")
        scale = inits.get(node.input[1])
        if scale is None:
            problems.append(f"{node.name}: scale is not a constant")
        elif node.op_type == "QuantizeLinear" and node.input[0] not in inits and scale.dims:
            problems.append(f"{node.name}: per-channel activation quantization (TensorRT "
                            f"expects per-tensor scales on activations)")
    return problems


def qdq_summary(model) -> dict:
    """Counts for reports: activation quantizers, weight dequantizers, per-channel weights."""
    inits = _initializers(model)
    nodes = model.graph.node
    activations = sum(n.op_type == "QuantizeLinear" and n.input[0] not in inits for n in nodes)
    weights = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    per_channel = sum(bool(inits[n.input[1]].dims) for n in weights if n.input[1] in inits)
    return {"activation_quantizers": activations, "int8_weights": len(weights),
            "per_channel_weights": per_channel}
