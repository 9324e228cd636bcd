"""ONNX models run by ONNX Runtime: the plain FP32 export and the TensorRT-ready FP16 / Q/DQ INT8
ONNX (which record their precision)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lrformer_edge.backends.base import ArtifactDescription, Backend, variant_checked
from lrformer_edge.backends.onnxruntime import benchmark
from lrformer_edge.backends.onnxruntime.export import export_onnx
from lrformer_edge.backends.onnxruntime.format import read_onnx_metadata
from lrformer_edge.backends.onnxruntime.runner import OnnxRuntimeRunner

# What an ONNX file may record: fp32 exports, and the fp16/int8 ONNX made for TensorRT.
PRECISION_KEYS = ("fp32", "fp16", "int8")


def describe(path: Path, options: Mapping) -> ArtifactDescription:
    metadata = read_onnx_metadata(path)
    return ArtifactDescription("onnxruntime", metadata.get("precision", "fp32"), metadata=metadata)


BACKEND = Backend(
    name="onnxruntime", title="ONNX model", suffixes=(".onnx",),
    precisions=("fp32",), precision_keys=PRECISION_KEYS, extra=None,
    open_runner=variant_checked(OnnxRuntimeRunner), describe=describe, export=export_onnx,
    benchmark_candidates=benchmark.candidates,
)
