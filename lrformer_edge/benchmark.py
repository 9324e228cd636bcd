"""Latency, throughput and accuracy of several backends measured side by side in one run.

Latency: median / p90 / p99 of single-image synchronous calls after warm-up, measured
round-robin across backends (one call of each per round) so that load drift on these noisy
machines affects all alike; speed-ups are ratios of those medians. Throughput: frames
per second with every parallel request busy (OpenVINO's throughput mode), or 1 / mean latency for
synchronous backends.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from lrformer_edge.cpu import DEFAULT_INT8_TARGET, host_cpu, resolve_int8_target


@dataclass
class BenchmarkRow:
    backend: str
    precision: str
    status: str = "ok"
    format: str = ""
    median_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    fps: float | None = None
    speedup_vs_pytorch: float | None = None
    miou: float | None = None
    agreement_vs_pytorch: float | None = None
    size_mib: float | None = None
    settings: dict = field(default_factory=dict)


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure_interleaved(runners: list, feed: dict, warmup: int = 5, iterations: int = 30,
                        settle_seconds: float = 0.2) -> list[dict]:
    """Latency statistics of several active runners, measured round-robin: one call of each per
    round, so drifting machine load (these machines are noisy) hits every backend alike and the
    ratios between them are fair. Between calls the machine rests ``settle_seconds``: ONNX
    Runtime's and OpenVINO's worker threads spin for a while after a call and would otherwise
    steal the cores from the next backend."""
    for runner in runners:
        for _ in range(warmup):
            runner.infer(feed)
        runner.timings.clear()
    for _ in range(iterations):
        for runner in runners:
            time.sleep(settle_seconds)
            runner.infer(feed)
    stats = []
    for runner in runners:
        times = [1000 * t for t in runner.timings]
        stats.append({"median_ms": statistics.median(times), "p90_ms": percentile(times, 90),
                      "p99_ms": percentile(times, 99), "mean_ms": statistics.fmean(times)})
        runner.timings.clear()
    return stats


def markdown_table(rows: list[BenchmarkRow], title: str, notes=()) -> str:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [f"### {title}", "",
             "| format | backend | precision | status | median ms | p90 ms | p99 ms | FPS | "
             "speed-up vs PyTorch | mIoU % | agreement vs PyTorch % | size MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.format} | {r.backend} | {r.precision} | {r.status} | {cell(r.median_ms, '.1f')} | "
            f"{cell(r.p90_ms, '.1f')} | {cell(r.p99_ms, '.1f')} | {cell(r.fps, '.2f')} | "
            f"{cell(r.speedup_vs_pytorch, '.2f')} | "
            f"{cell(None if r.miou is None else 100 * r.miou, '.2f')} | "
            f"{cell(None if r.agreement_vs_pytorch is None else 100 * r.agreement_vs_pytorch, '.3f')} | "
            f"{cell(r.size_mib, '.1f')} |")
    lines += [""] + list(notes) if notes else []
    return "\n".join(lines) + "\n"


def rows_as_json(rows: list[BenchmarkRow]) -> list[dict]:
    return [asdict(r) for r in rows]


@dataclass
class Candidate:
    format: str
    backend: str
    precision: str
    make_runner: object = None  # () -> Runner; None when skipped
    artifact: object = None
    status: str = "ok"


def _artifact_mib(artifact) -> float | None:
    from lrformer_edge.files import artifact_size_bytes

    return None if artifact is None else artifact_size_bytes(artifact) / 2**20


def int8_row_name(target_isa: str) -> str:
    """Benchmark precision label of an OpenVINO INT8 IR made for ``target_isa``."""
    return "int8" if target_isa == DEFAULT_INT8_TARGET else f"int8-{target_isa}"


def _openvino_candidates(model, input_size, work_dir, calibration, threads, all_formats, log,
                         int8_targets):
    from lrformer_edge.backends.openvino.export import export_openvino
    from lrformer_edge.backends.openvino.runner import OpenVINORunner

    log("exporting OpenVINO FP32 IR")
    irs = {"fp32": export_openvino(model, work_dir / "openvino-fp32", input_size, "fp32").path}
    if all_formats:
        log("exporting OpenVINO FP16 IR")
        irs["fp16"] = export_openvino(model, work_dir / "openvino-fp16", input_size, "fp16").path
    for target in int8_targets:
        log(f"quantizing to OpenVINO INT8 for {target} CPUs (NNCF PTQ)")
        irs[int8_row_name(target)] = export_openvino(
            model, work_dir / f"openvino-{int8_row_name(target)}", input_size, "int8",
            calibration=calibration(), target_isa=target).path
    runs = [("fp32", "fp32", "f32"), ("bf16", "fp32", "bf16")]
    runs += [("fp16", "fp16", "f32")] if all_formats else []
    for target in int8_targets:
        name = int8_row_name(target)
        runs += [(name, name, "f32"), (f"{name}+bf16", name, "bf16")]
    return [Candidate("OpenVINO IR", "openvino", name,
                      lambda p=irs[weights], h=hint: OpenVINORunner(p, precision=h, threads=threads),
                      irs[weights]) for name, weights, hint in runs]


def _tensorrt_candidates(model, input_size, work_dir, calibration, threads, log):
    """TensorRT-ready ONNX (run by ONNX Runtime here) and, where possible, engines."""
    from lrformer_edge.backends.onnxruntime.runner import OnnxRuntimeRunner
    from lrformer_edge.backends.tensorrt.engine import (
        build_engine,
        tensorrt_unavailable_reason,
    )
    from lrformer_edge.backends.tensorrt.export import export_tensorrt_onnx

    candidates, onnx_files = [], {}
    for precision in ("fp16", "int8"):
        log(f"exporting the {precision} TensorRT ONNX")
        path = work_dir / f"tensorrt-{precision}.onnx"
        export_tensorrt_onnx(model, path, input_size, precision,
                             calibration() if precision == "int8" else None)
        onnx_files[precision] = path
        candidates.append(Candidate(f"ONNX for TensorRT ({'Q/DQ' if precision == 'int8' else 'FP16'})",
                                    "onnxruntime", precision,
                                    lambda p=path: OnnxRuntimeRunner(p, threads=threads), path))
    reason = tensorrt_unavailable_reason()
    for precision, path in onnx_files.items():
        if reason:
            candidates.append(Candidate("TensorRT engine", "tensorrt", precision,
                                        status=f"skipped: {reason}"))
            continue
        from lrformer_edge.backends.tensorrt.runner import TensorRTRunner

        log(f"building the {precision} TensorRT engine")
        engine = build_engine(path, work_dir / f"tensorrt-{precision}.engine").path
        candidates.append(Candidate("TensorRT engine", "tensorrt", precision,
                                    lambda e=engine: TensorRTRunner(e), engine))
    return candidates


def _coreml_candidate(model, input_size, work_dir, log) -> Candidate:
    from lrformer_edge.backends.coreml.runner import coreml_unavailable_reason

    reason = coreml_unavailable_reason()
    if reason:
        return Candidate("Core ML package", "coreml", "fp16", status=f"skipped: {reason}")
    from lrformer_edge.backends.coreml.export import CoreMLOptions, export_coreml
    from lrformer_edge.backends.coreml.runner import CoreMLRunner

    log("exporting the FP16 Core ML package")
    package = export_coreml(model, work_dir / "coreml-fp16.mlpackage", input_size,
                            CoreMLOptions(input_type="tensor")).path
    return Candidate("Core ML package", "coreml", "fp16",
                     lambda p=package: CoreMLRunner(p), package)


def run_benchmark(model, input_size, work_dir, eval_images: int = 20, iterations: int = 30,
                  warmup: int = 5, calibration_images: int = 300, calibration_source: str = "procedural",
                  threads: int | None = None, log=print, all_formats: bool = False,
                  int8_targets: tuple[str, ...] = (DEFAULT_INT8_TARGET,)) -> list[BenchmarkRow]:
    """Export to every format available here, then measure each backend in this one process.

    ``int8_targets``: the x86 CPU ISAs to make OpenVINO INT8 IRs for (``lrformer_edge.cpu``),
    one row each (e.g. ``("portable", "vnni")`` to see what the portable form costs). A row whose
    precision hint this CPU cannot honour (bf16 without native bf16) is listed as skipped with
    the reason, not measured as if it were bf16.

    ``all_formats`` adds OpenVINO FP16, the FP16 and Q/DQ INT8 TensorRT ONNX files (run by ONNX
    Runtime), TensorRT engines where TensorRT and a GPU exist, and CoreML (listed as skipped
    with the reason where it cannot run).
    """
    from pathlib import Path

    from lrformer_edge.artifacts.parity import parity_inputs
    from lrformer_edge.backends.onnxruntime.export import export_onnx
    from lrformer_edge.backends.onnxruntime.runner import OnnxRuntimeRunner
    from lrformer_edge.backends.pytorch.runner import TorchRunner
    from lrformer_edge.evaluation import (
        evaluate_pipeline,
        keep_labels,
        procedural_validation_samples,
    )
    from lrformer_edge.pipeline import SegmentationPipeline

    work_dir = Path(work_dir)
    int8_targets = tuple(dict.fromkeys(resolve_int8_target(t) for t in int8_targets))
    data = model.config.data
    feed = {"input": parity_inputs(input_size)}
    calibration_cache = []

    def calibration():
        if not calibration_cache:
            from lrformer_edge.data.calibration import build_calibration_set

            log(f"building a {calibration_images}-image calibration set from {calibration_source}")
            calibration_cache.append(build_calibration_set(calibration_source, data, input_size,
                                                           calibration_images))
        return calibration_cache[0]

    def samples():
        return procedural_validation_samples(eval_images, tuple(input_size))

    candidates = [Candidate("PyTorch", "pytorch", "fp32",
                            lambda: TorchRunner(model, input_size=input_size))]
    onnx_path = work_dir / "model.onnx"
    log(f"exporting ONNX to {onnx_path}")
    export_onnx(model, onnx_path, input_size)
    candidates.append(Candidate("ONNX", "onnxruntime", "fp32",
                                lambda: OnnxRuntimeRunner(onnx_path, threads=threads), onnx_path))
    try:
        candidates += _openvino_candidates(model, input_size, work_dir, calibration, threads,
                                           all_formats, log, int8_targets)
    except ImportError as missing:
        candidates.append(Candidate("OpenVINO IR", "openvino", "all", status=f"skipped: {missing}"))
    if all_formats:
        try:
            candidates += _tensorrt_candidates(model, input_size, work_dir, calibration, threads,
                                               log)
        except ImportError as missing:
            candidates.append(Candidate("ONNX for TensorRT", "onnxruntime", "int8",
                                        status=f"skipped: {missing}"))
        candidates.append(_coreml_candidate(model, input_size, work_dir, log))

    rows = [BenchmarkRow(c.backend, c.precision, c.status, c.format,
                         size_mib=_artifact_mib(c.artifact)) for c in candidates]
    measured = [(row, c) for row, c in zip(rows, candidates) if c.make_runner is not None]
    runners = [c.make_runner() for _, c in measured]
    try:
        for runner in runners:
            runner.activate()
        measured, runners = _without_unhonoured_hints(measured, runners)
        log(f"measuring latency of {len(runners)} backends round-robin "
            f"({warmup} warm-up + {iterations} calls each)")
        for (row, _), runner, stats in zip(measured, runners,
                                           measure_interleaved(runners, feed, warmup, iterations)):
            row.settings = runner.settings
            row.median_ms, row.p90_ms, row.p99_ms = (stats["median_ms"], stats["p90_ms"],
                                                      stats["p99_ms"])
            row.fps = 1000.0 / stats["mean_ms"]
    finally:
        for runner in runners:
            runner.deactivate()
    reference_labels = None
    base_median = measured[0][0].median_ms
    for (row, candidate), runner in zip(measured, runners):
        log(f"accuracy of {candidate.format} {candidate.precision}")
        labels: dict = {}
        with runner:
            metrics = evaluate_pipeline(SegmentationPipeline(runner, data), samples(),
                                        keep_labels(labels), reference_labels)
        if candidate.backend == "openvino":
            throughput_runner = candidate.make_runner()
            throughput_runner.mode = "throughput"
            with throughput_runner:
                row.fps = throughput_runner.throughput(feed)
        if reference_labels is None:  # the first row, PyTorch, is the ground truth
            reference_labels = labels
        row.miou = metrics["mIoU"]
        row.agreement_vs_pytorch = metrics.get("pixel_agreement", 1.0)
        row.speedup_vs_pytorch = base_median / row.median_ms
    return rows


def _without_unhonoured_hints(measured, runners):
    """Drop (and mark skipped) the rows whose runner computes in another precision than asked:
    OpenVINO runs the bf16 hint in f32 on CPUs without native bf16."""
    from lrformer_edge.artifacts.runner import unhonoured_hint

    kept = []
    for (row, candidate), runner in zip(measured, runners):
        settings = runner.settings
        fallback = unhonoured_hint(settings)
        if fallback:
            row.status = f"skipped: {fallback} ({host_cpu().describe()})"
            row.settings = settings
            runner.deactivate()
            continue
        kept.append(((row, candidate), runner))
    return [pair for pair, _ in kept], [runner for _, runner in kept]


def benchmark_title(model_name: str, input_size, threads: int, eval_images: int) -> str:
    """The title of a benchmark, naming the CPU and its ISA: every timing depends on them."""
    return (f"{model_name} at {input_size[0]}x{input_size[1]}, batch 1, "
            f"{host_cpu().describe()}, {threads} threads, {eval_images} held-out scenes")


def cpu_notes() -> list[str]:
    """Where INT8 or bf16 cannot be fast on this CPU, said under the table."""
    note = host_cpu().int8_note()
    return [f"This CPU: {note}."] if note else []






