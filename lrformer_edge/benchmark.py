"""Latency, throughput and accuracy of several backends measured side by side in one run.

Latency: median / p90 / p99 of single-image synchronous calls after warm-up; speed-ups are
ratios of medians taken in the same process, since these machines are noisy. Throughput: frames
per second with every parallel request busy (OpenVINO's throughput mode), or 1 / mean latency for
synchronous backends.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class BenchmarkRow:
    backend: str
    precision: str
    status: str = "ok"
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


def measure_latency(runner, feed: dict, warmup: int = 5, iterations: int = 30) -> dict:
    """Per-call latency statistics (ms) of an active runner."""
    for _ in range(warmup):
        runner.infer(feed)
    runner.timings.clear()
    for _ in range(iterations):
        runner.infer(feed)
    times = [1000 * t for t in runner.timings]
    return {"median_ms": statistics.median(times), "p90_ms": percentile(times, 90),
            "p99_ms": percentile(times, 99), "mean_ms": statistics.fmean(times)}


def markdown_table(rows: list[BenchmarkRow], title: str) -> str:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [f"### {title}", "",
             "| backend | precision | status | median ms | p90 ms | p99 ms | FPS | speed-up vs PyTorch "
             "| mIoU % | agreement vs PyTorch % | size MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.backend} | {r.precision} | {r.status} | {cell(r.median_ms, '.1f')} | "
            f"{cell(r.p90_ms, '.1f')} | {cell(r.p99_ms, '.1f')} | {cell(r.fps, '.2f')} | "
            f"{cell(r.speedup_vs_pytorch, '.2f')} | "
            f"{cell(None if r.miou is None else 100 * r.miou, '.2f')} | "
            f"{cell(None if r.agreement_vs_pytorch is None else 100 * r.agreement_vs_pytorch, '.3f')} | "
            f"{cell(r.size_mib, '.1f')} |")
    return "\n".join(lines) + "\n"


def rows_as_json(rows: list[BenchmarkRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def run_benchmark(model, input_size, work_dir, eval_images: int = 20, iterations: int = 30,
                  warmup: int = 5, calibration_images: int = 300, calibration_source: str = "procedural",
                  threads: int | None = None, log=print) -> list[BenchmarkRow]:
    """Export to every format available here, then measure each backend in this one process."""
    from pathlib import Path

    from lrformer_edge.evaluation import (
        evaluate_pipeline,
        keep_labels,
        procedural_validation_samples,
    )
    from lrformer_edge.pipeline import SegmentationPipeline
    from lrformer_edge.export.onnx import export_onnx, parity_inputs
    from lrformer_edge.runners.onnxruntime import OnnxRuntimeRunner
    from lrformer_edge.runners.torch import TorchRunner

    work_dir = Path(work_dir)
    data = model.config.data
    feed = {"input": parity_inputs(input_size)}
    rows: list[BenchmarkRow] = []

    def samples():
        return procedural_validation_samples(eval_images, tuple(input_size))

    candidates = [("pytorch", "fp32", lambda: TorchRunner(model, input_size=input_size), None)]
    onnx_path = work_dir / "model.onnx"
    log(f"exporting ONNX to {onnx_path}")
    export_onnx(model, onnx_path, input_size)
    candidates.append(("onnxruntime", "fp32",
                       lambda: OnnxRuntimeRunner(onnx_path, threads=threads), onnx_path))
    try:
        from lrformer_edge.export.openvino import export_openvino
        from lrformer_edge.quant.calibration import build_calibration_set
        from lrformer_edge.runners.openvino import OpenVINORunner

        log("exporting OpenVINO FP32 IR")
        fp32_ir = export_openvino(model, work_dir / "openvino-fp32", input_size, "fp32").path
        log(f"building a {calibration_images}-image calibration set from {calibration_source}")
        calibration = build_calibration_set(calibration_source, data, input_size,
                                            calibration_images)
        log("quantizing to OpenVINO INT8 (NNCF PTQ)")
        int8_ir = export_openvino(model, work_dir / "openvino-int8", input_size, "int8",
                                  calibration=calibration).path
        for precision, path, hint in (("fp32", fp32_ir, "f32"), ("bf16", fp32_ir, "bf16"),
                                      ("int8", int8_ir, "f32"), ("int8+bf16", int8_ir, "bf16")):
            candidates.append(("openvino", precision,
                               lambda p=path, h=hint: OpenVINORunner(p, precision=h, threads=threads),
                               path))
    except ImportError as missing:
        rows.append(BenchmarkRow("openvino", "all", status=f"skipped: {missing}"))

    reference_labels = None
    base_median = None
    for backend, precision, make_runner, artifact in candidates:
        log(f"measuring {backend} {precision}")
        row = BenchmarkRow(backend, precision)
        runner = make_runner()
        with runner:
            row.settings = runner.settings
            stats = measure_latency(runner, feed, warmup, iterations)
            row.median_ms, row.p90_ms, row.p99_ms = (stats["median_ms"], stats["p90_ms"],
                                                      stats["p99_ms"])
            row.fps = 1000.0 / stats["mean_ms"]
            labels: dict = {}
            metrics = evaluate_pipeline(SegmentationPipeline(runner, data), samples(),
                                        keep_labels(labels), reference_labels)
        if backend == "openvino":
            throughput_runner = make_runner()
            throughput_runner.mode = "throughput"
            with throughput_runner:
                row.fps = throughput_runner.throughput(feed)
        if reference_labels is None:  # the first row, PyTorch, is the ground truth
            reference_labels, base_median = labels, row.median_ms
        row.miou = metrics["mIoU"]
        row.agreement_vs_pytorch = metrics.get("pixel_agreement", 1.0)
        row.speedup_vs_pytorch = base_median / row.median_ms
        if artifact is not None:
            files = [artifact, artifact.with_suffix(".bin")]
            row.size_mib = sum(f.stat().st_size for f in files if f.is_file()) / 2**20
        rows.append(row)
    return rows
