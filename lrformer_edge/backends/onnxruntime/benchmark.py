"""The benchmark's ONNX Runtime row: the plain FP32 ONNX export."""
from __future__ import annotations

from lrformer_edge.backends.base import BenchmarkContext, Candidate
from lrformer_edge.backends.onnxruntime.export import export_onnx
from lrformer_edge.backends.onnxruntime.runner import OnnxRuntimeRunner


def candidates(context: BenchmarkContext) -> list[Candidate]:
    path, threads = context.work_dir / "model.onnx", context.threads
    context.log(f"exporting ONNX to {path}")
    export_onnx(context.model, path, context.input_size)
    return [Candidate("ONNX", "onnxruntime", "fp32",
                      lambda: OnnxRuntimeRunner(path, threads=threads), path)]
