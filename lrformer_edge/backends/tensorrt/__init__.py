"""TensorRT engines (.engine/.plan with their JSON sidecar) on NVIDIA GPUs, built on the target
from the TensorRT-ready ONNX (FP32, FP16, or Q/DQ INT8)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lrformer_edge.artifacts.metadata import decode_metadata
from lrformer_edge.backends.base import ArtifactDescription, Backend, variant_checked
from lrformer_edge.backends.tensorrt import benchmark
from lrformer_edge.backends.tensorrt.engine import tensorrt_unavailable_reason
from lrformer_edge.backends.tensorrt.export import (
    PRECISION_SCHEMES,
    TRT_PRECISIONS,
    export_mixed_qdq_onnx,
    export_qat_qdq_onnx,
    export_tensorrt_onnx,
)
from lrformer_edge.backends.tensorrt.qdq import quantize_qdq, quantizer_rules
from lrformer_edge.backends.tensorrt.runner import TensorRTRunner
from lrformer_edge.backends.tensorrt.sidecar import read_sidecar


def unavailable_reason() -> str | None:
    reason = tensorrt_unavailable_reason()
    return f"needs TensorRT and an NVIDIA GPU: {reason}" if reason else None


def describe_engine(path: Path, options: Mapping) -> ArtifactDescription:
    """From the sidecar: readable without TensorRT or a GPU."""
    sidecar = read_sidecar(path)
    return ArtifactDescription("tensorrt", sidecar.get("precision", "fp32"),
                               metadata=decode_metadata(sidecar.get("metadata") or {}))


BACKEND = Backend(
    name="tensorrt", title="TensorRT engine", suffixes=(".engine", ".plan"),
    precisions=TRT_PRECISIONS, precision_keys=TRT_PRECISIONS, extra="tensorrt-runtime",
    unavailable_reason=unavailable_reason,
    open_runner=variant_checked(TensorRTRunner), describe=describe_engine,
    benchmark_candidates=benchmark.candidates,
    export=export_tensorrt_onnx, quantize=quantize_qdq, quantizer_rules=quantizer_rules,
    export_qat=export_qat_qdq_onnx, qat_artifact_name="lrformer-qat-int8.onnx",
    precision_schemes=PRECISION_SCHEMES, export_mixed=export_mixed_qdq_onnx,
)
