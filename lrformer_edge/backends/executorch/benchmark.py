"""The benchmark's ExecuTorch rows (--all only): the FP32 and the PT2E INT8 ``.pte`` on XNNPACK.

The default table holds what deploys on this x86 host (ONNX Runtime, OpenVINO); ExecuTorch's
targets are ARM phones and boards, where these programs run the same XNNPACK kernels, so here
its rows are a proxy beside them, like the other targets' rows under --all (and its two
exports take minutes). XNNPACK accumulates int8 products in 32 bits on every CPU, so one INT8
program serves every ``--cpu-isa`` target (those make OpenVINO's x86 variants)."""
from __future__ import annotations

from pathlib import Path

from lrformer_edge.backends.base import BenchmarkContext, Candidate
from lrformer_edge.backends.executorch.runner import ExecuTorchRunner

FORMAT = "ExecuTorch (XNNPACK)"


def candidates(context: BenchmarkContext) -> list[Candidate]:
    if not context.all_formats:
        return []
    programs = {precision: _export(context, precision) for precision in ("fp32", "int8")}
    return [Candidate(FORMAT, "executorch", precision,
                      lambda p=path: ExecuTorchRunner(p, threads=context.threads), path)
            for precision, path in programs.items()]


def _export(context: BenchmarkContext, precision: str) -> Path:
    # export_executorch needs PyTorch, which the registry (importing this module) must not load.
    from lrformer_edge.backends.executorch.export import export_executorch

    context.log(f"exporting the {precision.upper()} ExecuTorch program (XNNPACK)")
    return export_executorch(
        context.model, context.work_dir / f"executorch-{precision}.pte", context.input_size,
        precision, calibration=context.calibration() if precision == "int8" else None,
        threads=context.threads, log=context.log).path
