"""The benchmark's Core ML row (--all only): the FP16 package, skipped with the reason where Core
ML cannot predict (anywhere but macOS)."""
from __future__ import annotations

from lrformer_edge.backends.base import BenchmarkContext, Candidate
from lrformer_edge.backends.coreml.export import CoreMLOptions, export_coreml
from lrformer_edge.backends.coreml.runner import CoreMLRunner, coreml_unavailable_reason


def candidates(context: BenchmarkContext) -> list[Candidate]:
    if not context.all_formats:
        return []
    reason = coreml_unavailable_reason()
    if reason:
        return [Candidate("Core ML package", "coreml", "fp16", status=f"skipped: {reason}")]
    context.log("exporting the FP16 Core ML package")
    package = export_coreml(context.model, context.work_dir / "coreml-fp16.mlpackage",
                            context.input_size, CoreMLOptions(input_type="tensor")).path
    return [Candidate("Core ML package", "coreml", "fp16", lambda: CoreMLRunner(package),
                      package)]
