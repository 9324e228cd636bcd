"""The benchmark's TensorRT rows (--all only): the FP16 and Q/DQ INT8 TensorRT-ready ONNX, run by
ONNX Runtime here, and the engines built from them where TensorRT and a GPU exist (skipped rows
say what is missing otherwise)."""
from __future__ import annotations

from pathlib import Path

from lrformer_edge.backends.base import BenchmarkContext, Candidate
from lrformer_edge.backends.tensorrt.engine import (
    build_engine,
    tensorrt_unavailable_reason,
)
from lrformer_edge.backends.tensorrt.export import export_tensorrt_onnx
from lrformer_edge.backends.tensorrt.runner import TensorRTRunner

# The row format of each TensorRT-ready ONNX the benchmark makes, by precision
ONNX_FORMATS = {"fp16": "ONNX for TensorRT (FP16)", "int8": "ONNX for TensorRT (Q/DQ)"}


def candidates(context: BenchmarkContext) -> list[Candidate]:
    if not context.all_formats:
        return []
    onnx_files = {precision: _export_onnx(context, precision) for precision in ONNX_FORMATS}
    rows = [Candidate(ONNX_FORMATS[precision], "onnxruntime", precision,
                      lambda p=path: context.open_runner(p, threads=context.threads), path)
            for precision, path in onnx_files.items()]
    reason = tensorrt_unavailable_reason()
    return rows + [_engine_row(context, precision, path, reason)
                   for precision, path in onnx_files.items()]


def _export_onnx(context: BenchmarkContext, precision: str) -> Path:
    context.log(f"exporting the {precision} TensorRT ONNX")
    path = context.work_dir / f"tensorrt-{precision}.onnx"
    export_tensorrt_onnx(context.model, path, context.input_size, precision,
                         context.calibration() if precision == "int8" else None)
    return path


def _engine_row(context: BenchmarkContext, precision: str, onnx_path: Path,
                unavailable: str | None) -> Candidate:
    if unavailable:
        return Candidate("TensorRT engine", "tensorrt", precision, status=f"skipped: {unavailable}")
    context.log(f"building the {precision} TensorRT engine")
    engine = build_engine(onnx_path, context.work_dir / f"tensorrt-{precision}.engine").path
    return Candidate("TensorRT engine", "tensorrt", precision, lambda: TensorRTRunner(engine),
                     engine)
