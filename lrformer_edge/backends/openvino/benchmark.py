"""The benchmark's OpenVINO rows: FP32 weights run with the f32 and bf16 precision hints, one INT8
IR per asked x86 target run with both hints, and (--all) FP16 weights. Every row also measures
OpenVINO's own throughput mode."""
from __future__ import annotations

from pathlib import Path

from lrformer_edge.backends.base import BenchmarkContext, Candidate
from lrformer_edge.backends.openvino.runner import OpenVINORunner
from lrformer_edge.cpu import DEFAULT_INT8_TARGET


def int8_row_name(target_isa: str) -> str:
    """Benchmark precision label of an OpenVINO INT8 IR made for ``target_isa``."""
    return "int8" if target_isa == DEFAULT_INT8_TARGET else f"int8-{target_isa}"


def candidates(context: BenchmarkContext) -> list[Candidate]:
    irs = _export_irs(context)
    return [Candidate("OpenVINO IR", "openvino", name,
                      lambda p=irs[weights], h=hint: OpenVINORunner(p, precision=h,
                                                                    threads=context.threads),
                      irs[weights], throughput=True)
            for name, weights, hint in _runs(context)]


def _runs(context: BenchmarkContext) -> list[tuple[str, str, str]]:
    """(row name, IR it runs, precision hint), in table order."""
    runs = [("fp32", "fp32", "f32"), ("bf16", "fp32", "bf16")]
    runs += [("fp16", "fp16", "f32")] if context.all_formats else []
    for target in context.int8_targets:
        name = int8_row_name(target)
        runs += [(name, name, "f32"), (f"{name}+bf16", name, "bf16")]
    return runs


def _export_irs(context: BenchmarkContext) -> dict[str, Path]:
    """The IRs the rows run, by weights name."""
    # export_openvino needs PyTorch, which the registry (importing this module) must not load.
    from lrformer_edge.backends.openvino.export import export_openvino

    model, size, work_dir, log = (context.model, context.input_size, context.work_dir,
                                  context.log)
    log("exporting OpenVINO FP32 IR")
    irs = {"fp32": export_openvino(model, work_dir / "openvino-fp32", size, "fp32").path}
    if context.all_formats:
        log("exporting OpenVINO FP16 IR")
        irs["fp16"] = export_openvino(model, work_dir / "openvino-fp16", size, "fp16").path
    for target in context.int8_targets:
        name = int8_row_name(target)
        log(f"quantizing to OpenVINO INT8 for {target} CPUs (NNCF PTQ)")
        irs[name] = export_openvino(model, work_dir / f"openvino-{name}", size, "int8",
                                    calibration=context.calibration(), target_isa=target).path
    return irs
