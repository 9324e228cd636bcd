"""TensorRT target in two steps.

1. ``export_tensorrt_onnx`` (any machine): the deploy form to a TensorRT-ready ONNX.
   * fp32: the parity-checked ONNX of ``export_onnx``.
   * fp16: FP16 weights and activations, with LayerNorm, Softmax and Resize kept in FP32 and FP32
     inputs/outputs (TensorRT 11 builds what the ONNX types say: FP16 means an FP16 ONNX).
   * int8: explicit quantization, Q/DQ from NNCF post-training calibration (``quant.qdq``).
   ``export_qat_qdq_onnx``: the Q/DQ ONNX of a QAT model (its NNCF quantizers as Q/DQ pairs).
   Both go through ``write_checked_onnx``: every file is structurally checked (operators in
   TensorRT 10's ONNX support matrix, opset <= 20, int8 Q/DQ with zero-points 0), compared with its
   PyTorch model through ONNX Runtime, and only then moved into place.
2. ``build_engine`` (where TensorRT and an NVIDIA GPU exist): strongly typed network (types come
   from the ONNX, the only mode TensorRT 11 has), workspace limit, timing cache (refused when it
   was made by another TensorRT/GPU), optional DLA core with GPU fallback; the engine is written
   with a JSON sidecar naming the TensorRT version, GPU, the ONNX's SHA-256 and the calibration
   set's hash.
"""
from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.metadata import (
    artifact_metadata,
    decode_metadata,
)
from lrformer_edge.artifacts.parity import (
    INPUT_NAME,
    OUTPUT_NAME,
    QAT_EXPORT_PARITY,
    ParityThresholds,
    parity_inputs,
    parity_thresholds,
)
from lrformer_edge.artifacts.precision_config import (
    METADATA_KEY,
    PrecisionConfig,
    checked_precision_config,
)
from lrformer_edge.artifacts.result import ArtifactCheckError, ExportResult
from lrformer_edge.backends.layer_names import float_layer_nodes, onnx_layer_nodes
from lrformer_edge.backends.nncf_statistics import open_statistics_cache
from lrformer_edge.backends.onnxruntime.export import (
    MAX_OPSET,
    MIN_OPSET,
    check_onnx_parity,
    export_onnx,
)
from lrformer_edge.backends.onnxruntime.format import op_histogram, read_onnx_metadata
from lrformer_edge.files import atomic_write, check_output_file
from lrformer_edge.registry import input_size_of

TRT_PRECISIONS = ("fp32", "fp16", "int8")
PRECISION_SCHEMES = ("int8",)  # of a precision config: Q/DQ INT8 with float overrides
FP16_FLOAT_OPS = ("LayerNormalization", "Softmax", "Resize")


def tensorrt_problems(graph) -> list[str]:
    """Why TensorRT 10.x/11.x would not take this ONNX: operators, opset, Q/DQ form."""
    from lrformer_edge.backends.tensorrt.ops import unsupported_ops
    from lrformer_edge.backends.tensorrt.qdq import qdq_problems

    problems = [f"operator {op} is not in TensorRT 10's ONNX support matrix"
                for op in unsupported_ops(graph)]
    opsets = [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")]
    if opsets and max(opsets) > MAX_OPSET:
        problems.append(f"opset {max(opsets)} > {MAX_OPSET} (newest TensorRT 10.x parses)")
    return problems + qdq_problems(graph)


def require_tensorrt_form(graph, what: str) -> None:
    """Raise ``ArtifactCheckError`` (nothing gets written) when TensorRT would not take it."""
    problems = tensorrt_problems(graph)
    if problems:
        raise ArtifactCheckError(f"{what} is not in the form TensorRT takes: "
                                 + "; ".join(problems[:5]))


def fold_constants(path: Path, folded: Path):
    """Constant-fold with ONNX Runtime's basic level (standard ONNX rewrites only): the pooling
    matrices and reshaped weights become initializers, so Q/DQ on them is recognisably weight
    quantization and TensorRT sees no Shape/Gather arithmetic."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    # On Q/DQ graphs ONNX Runtime would also quantize biases to int32 DequantizeLinear nodes,
    # which TensorRT does not take.
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["WeightBiasQuantization"])
    graph = onnx.load(str(folded))
    used = {node.domain for node in graph.graph.node} | {""}
    kept = [o for o in graph.opset_import if o.domain in used]
    del graph.opset_import[:]
    graph.opset_import.extend(kept)
    return graph


def to_fp16(graph):
    """FP16 ONNX for TensorRT: FP32 I/O and FP32 LayerNorm/Softmax/Resize."""
    from lrformer_edge.artifacts.optional import require

    float16 = require("onnxruntime.transformers.float16", "dev", "FP16 ONNX conversion")
    converted = float16.convert_float_to_float16(graph, keep_io_types=True,
                                                 op_block_list=list(FP16_FLOAT_OPS))
    return topologically_sorted(converted)  # the converter appends the input casts last


def topologically_sorted(graph):
    """Reorder nodes so each comes after the producers of its inputs (ONNX requires it)."""
    available = {i.name for i in graph.graph.input} | {i.name for i in graph.graph.initializer}
    available.add("")  # omitted optional inputs
    pending, ordered = list(graph.graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ArtifactCheckError(f"the graph has a cycle or a dangling input near "
                                     f"{pending[0].name}")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for node in ready:
            ordered.append(node)
            available.update(node.output)
    del graph.graph.node[:]
    graph.graph.node.extend(ordered)
    return graph


def export_tensorrt_onnx(model, output: str | Path, input_size=None, precision: str = "int8",
                         calibration=None, parity: ParityThresholds | None = None,
                         statistics_cache: str | Path | bool = True,
                         precision_config: PrecisionConfig | None = None) -> ExportResult:
    """Write the TensorRT-ready ONNX for ``precision`` at ``output`` (checked, then renamed).
    ``statistics_cache`` (int8): where calibration statistics are reused from and kept
    (``nncf_statistics.open_statistics_cache``; False: none). ``precision_config`` (int8): its
    float layers get no Q/DQ, and the ONNX records the layer-precision list for the engine
    build (``precisions.py``)."""
    # PyTorch is imported on call: the registry imports this module and must not need it.
    from lrformer_edge.models.deploy import check_input_size, to_deploy

    if precision not in TRT_PRECISIONS:
        raise ValueError(f"precision must be one of {TRT_PRECISIONS}, got {precision!r}")
    if (precision == "int8") != (calibration is not None):
        raise ValueError("int8 needs a calibration set; fp32/fp16 take none")
    if precision_config is not None and precision != "int8":
        raise ValueError("a precision config applies to int8 only")
    input_size = check_input_size(input_size_of(model, input_size))
    precision_config = checked_precision_config(precision_config, model, input_size,
                                                PRECISION_SCHEMES, "TensorRT INT8 (Q/DQ ONNX)")
    output = _onnx_output(output)
    cache = open_statistics_cache(model, input_size, calibration, statistics_cache) \
        if precision == "int8" else None
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="lrformer-trt-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", input_size)
        graph = fold_constants(fp32.path, Path(tmp) / "folded.onnx")
        quantization = {}
        if precision == "fp16":
            graph = to_fp16(graph)
        elif precision == "int8":
            from lrformer_edge.backends.tensorrt.qdq import qdq_summary, quantize_qdq

            # Mapped on the constant-folded graph NNCF quantizes (its MatMul+Add are Gemms).
            float_nodes = float_layer_nodes(precision_config,
                                            lambda: onnx_layer_nodes(model, graph))
            graph, quantization = quantize_qdq(
                graph, calibration, cache, [name for names in float_nodes.values()
                                            for name in names], fp32.path)
            quantization["quantization"].update(qdq_summary(graph))
            if precision_config is not None:
                quantization.update(_mixed_metadata(precision_config, float_nodes, graph))
    metadata = artifact_metadata(
        model, input_size, format="onnx", target="tensorrt", precision=precision,
        opset=_opset(graph), batch_size=1, fp32_onnx_parity=fp32.parity.as_dict(), **quantization)
    feed = calibration.batches[0] if precision == "int8" else parity_inputs(input_size)
    return write_checked_onnx(graph, output, metadata, to_deploy(model, input_size), feed,
                              parity or parity_thresholds(precision),
                              f"{precision} TensorRT ONNX", start)


def _mixed_metadata(config: PrecisionConfig, float_nodes: dict[str, list[str]], graph) -> dict:
    from lrformer_edge.backends.tensorrt.precisions import LAYER_PRECISIONS_KEY, layer_precisions

    return {METADATA_KEY: config.metadata(), "float_layer_nodes": float_nodes,
            LAYER_PRECISIONS_KEY: layer_precisions(
                graph, [name for names in float_nodes.values() for name in names])}


def export_mixed_qdq_onnx(model, work_dir: str | Path, input_size,
                          precision_config: PrecisionConfig, calibration) -> ExportResult:
    """``Backend.export_mixed``: the Q/DQ ONNX of ``precision_config`` in ``work_dir``
    (``tensorrt-int8.onnx``; the engine is built on the target from it)."""
    return export_tensorrt_onnx(model, Path(work_dir) / "tensorrt-int8.onnx", input_size, "int8",
                                calibration, precision_config=precision_config)


def export_qat_qdq_onnx(quantized, payload: dict, output: str | Path,
                        feed: np.ndarray) -> ExportResult:
    """TensorRT Q/DQ ONNX of a QAT model, checked against the torch fake-quant model it came from.

    ``payload`` is its checkpoint as ``lrformer_edge.quant.qat.restore`` returns it, with the
    QAT settings under ``"quantization"``; ``feed`` a (1, 3, H, W) batch at its input size."""
    import torch  # on call, as in export_tensorrt_onnx

    from lrformer_edge.backends.tensorrt.qdq import qdq_summary, to_signed_int8

    output = _onnx_output(output)
    start = time.time()
    quantized.eval()
    with tempfile.TemporaryDirectory(prefix="lrformer-qat-onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer chatter about the fake-quant ops
            torch.onnx.export(_with_qdq_export(quantized), (torch.from_numpy(feed),), str(raw),
                              dynamo=False, opset_version=MIN_OPSET, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], do_constant_folding=True)
        graph = to_signed_int8(fold_constants(raw, Path(tmp) / "folded.onnx"))
    metadata = artifact_metadata(
        quantized, payload["input_size"], format="onnx", target="tensorrt", precision="int8",
        opset=_opset(graph), batch_size=1,
        quantization={**payload["quantization"], **qdq_summary(graph)},
        calibration_set=payload.get("calibration_set"))
    return write_checked_onnx(graph, output, metadata, quantized, feed, QAT_EXPORT_PARITY,
                              "QAT Q/DQ ONNX", start, reference_name="the QAT model")


def _with_qdq_export(quantized):
    """A copy whose NNCF quantizers export as ONNX QuantizeLinear/DequantizeLinear pairs
    (their default is OpenVINO's custom FakeQuantize op, which TensorRT does not parse)."""
    import copy

    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

    model = copy.deepcopy(quantized).eval()
    for _, module in get_hook_storage(model).named_hooks():
        if isinstance(module, BaseQuantizer):
            module.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    return model


def write_checked_onnx(graph, output: Path, metadata: dict, reference, feed: np.ndarray,
                       parity: ParityThresholds, what: str, started: float,
                       reference_name: str | None = None) -> ExportResult:
    """Write ``graph`` to ``output`` only when TensorRT takes it and it reproduces ``reference``.

    The graph gets ``metadata`` (``artifact_metadata``), must be in TensorRT's form and valid
    ONNX, and is compared with the PyTorch ``reference`` on ``feed`` through ONNX Runtime within
    ``parity`` (``reference_name`` names it in the message where it is not the FP32 model);
    ``what`` names the file in messages, ``started`` is when the export began."""
    import onnx

    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    require_tensorrt_form(graph, f"the {what}")
    try:
        onnx.checker.check_model(graph)
    except onnx.checker.ValidationError as error:
        raise ArtifactCheckError(f"the {what} is invalid: {error}") from None
    label = what + (f" vs {reference_name}" if reference_name else "")
    with tempfile.TemporaryDirectory(prefix="lrformer-trt-") as tmp:
        staged = Path(tmp) / "staged.onnx"
        onnx.save(graph, str(staged))
        agreement = check_onnx_parity(reference, staged, feed, parity, label)
        atomic_write(output, lambda path: Path(path).write_bytes(staged.read_bytes()))
    return ExportResult(output, agreement, time.time() - started, op_histogram(graph),
                        decode_metadata(metadata))


def _onnx_output(output: str | Path) -> Path:
    """Refuse an unusable output path before any work starts."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise ValueError(f"output must end in .onnx, got {output}")
    check_output_file(output)
    return output


def _opset(graph) -> int:
    return max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


def check_calibration_matches(onnx_path: Path, calibration) -> None:
    """Refuse calibration data that is not the set the Q/DQ ONNX was calibrated with."""
    recorded = (read_onnx_metadata(onnx_path).get("calibration_set") or {}).get("sha256")
    if recorded is None:
        raise ValueError(f"{onnx_path} records no calibration set (not an int8 Q/DQ ONNX from "
                         f"lrformer-edge); leave out --calib-data")
    if recorded != calibration.sha256:
        raise ValueError(f"calibration data does not match {onnx_path.name}: it was calibrated "
                         f"with set {recorded[:16]}..., the given data hashes to "
                         f"{calibration.sha256[:16]}... (same source, --calib-images and --seed "
                         f"give the same set)")

