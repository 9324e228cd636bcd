"""The benchmark's LiteRT rows (--all only): the FP32 and the INT8 ``.tflite`` on LiteRT's
XNNPACK delegate.

LiteRT's targets are Android phones and ARM boards, where these models run the same XNNPACK
kernels on the CPU (or a GPU or NPU delegate, not measured here); on this x86 host its rows are
a proxy beside the default table's, like the other targets' rows under --all. XNNPACK sums int8
products in 32 bits on every CPU, so one INT8 model serves every ``--cpu-isa`` target."""
from __future__ import annotations

from pathlib import Path

from lrformer_edge.backends.base import BenchmarkContext, Candidate
from lrformer_edge.backends.litert.runner import LiteRTRunner

FORMAT = "LiteRT (XNNPACK)"
PRECISIONS = ("fp32", "int8")  # FP16 runs as FP32 on CPUs: its row would repeat FP32's


def candidates(context: BenchmarkContext) -> list[Candidate]:
    if not context.all_formats:
        return []
    models = {precision: _export(context, precision) for precision in PRECISIONS}
    return [Candidate(FORMAT, "litert", precision,
                      lambda p=path: LiteRTRunner(p, threads=context.threads), path)
            for precision, path in models.items()]


def _export(context: BenchmarkContext, precision: str) -> Path:
    # export_litert needs PyTorch, which the registry (importing this module) must not load.
    from lrformer_edge.backends.litert.export import export_litert

    context.log(f"exporting the {precision.upper()} LiteRT model (XNNPACK)")
    return export_litert(
        context.model, context.work_dir / f"litert-{precision}.tflite", context.input_size,
        precision, calibration=context.calibration() if precision == "int8" else None,
        threads=context.threads, log=context.log).path
