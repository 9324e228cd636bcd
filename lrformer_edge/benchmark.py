"""Latency, throughput and accuracy of several backends measured side by side in one run.

The rows come from the backend registry (``lrformer_edge.backends.BACKENDS``): each backend's
``benchmark_candidates`` exports its artifacts and says how to run them; this module measures
them all alike and never matches a backend's name.

Latency: median / p90 / p99 of single-image synchronous calls after warm-up, measured
round-robin across backends (one call of each per round) so that load drift on these noisy
machines affects all alike; speed-ups are ratios of those medians. Throughput: frames
per second with every parallel request busy (OpenVINO's throughput mode), or 1 / mean latency for
synchronous backends.
"""
from __future__ import annotations

import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lrformer_edge import backends
from lrformer_edge.artifacts.parity import parity_inputs
from lrformer_edge.artifacts.runner import unhonoured_hint
from lrformer_edge.backends import load_runner
from lrformer_edge.backends.base import BenchmarkContext, Candidate
from lrformer_edge.cpu import DEFAULT_INT8_TARGET, host_cpu, resolve_int8_target
from lrformer_edge.data.calibration import (
    DEFAULT_CALIBRATION_IMAGES,
    PROCEDURAL,
    build_calibration_set,
    check_calibration_source,
)
from lrformer_edge.evaluation import (
    evaluate_pipeline,
    keep_labels,
    procedural_validation_samples,
)
from lrformer_edge.files import artifact_size_bytes, atomic_write
from lrformer_edge.models.factory import create_model
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.progress import heartbeat, track
from lrformer_edge.registry import BUNDLED_MODEL
from lrformer_edge.resources import check_export_size


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
    for runner in track(runners, what="backends", label=f"warm-up ({warmup} calls each)"):
        for _ in range(warmup):
            runner.infer(feed)
        runner.timings.clear()
    for _ in track(range(iterations), what="rounds",
                   label=f"latency of {len(runners)} backends round-robin"):
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


def _artifact_mib(artifact) -> float | None:
    return None if artifact is None else artifact_size_bytes(artifact) / 2**20


def run_benchmark(model, input_size, work_dir, eval_images: int = 20, iterations: int = 30,
                  warmup: int = 5, calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
                  calibration_source: str = PROCEDURAL, threads: int | None = None, log=print,
                  all_formats: bool = False,
                  int8_targets: tuple[str, ...] = (DEFAULT_INT8_TARGET,),
                  calibration_seed: int = 0) -> list[BenchmarkRow]:
    """Export to every format of every registered backend available here, then measure each in
    this one process. The rows are each backend's ``benchmark_candidates``, in registry order:
    the first (PyTorch) is the ground truth of agreement and speed-up.

    ``int8_targets``: the x86 CPU ISAs to make CPU INT8 artifacts for (``lrformer_edge.cpu``),
    one row each (e.g. ``("portable", "vnni")`` to see what the portable form costs). A row whose
    precision hint this CPU cannot honour (bf16 without native bf16) is listed as skipped with
    the reason, not measured as if it were bf16.

    ``all_formats`` adds the formats that are not CPU formats of the default table (OpenVINO
    FP16, the TensorRT ONNX files and engines, Core ML); a backend that cannot run here lists its
    rows as skipped with the reason.
    """
    context = BenchmarkContext(
        model, tuple(input_size), Path(work_dir),
        _calibration_once(calibration_source, model.config.data, input_size, calibration_images,
                          calibration_seed, log),
        threads, all_formats, tuple(dict.fromkeys(resolve_int8_target(t) for t in int8_targets)),
        open_runner=load_runner, log=log)
    candidates = collect_candidates(context)
    rows = [BenchmarkRow(c.backend, c.precision, c.status, c.format,
                         size_mib=_artifact_mib(c.artifact)) for c in candidates]
    measured = [(row, c) for row, c in zip(rows, candidates) if c.make_runner is not None]
    feed = {"input": parity_inputs(input_size)}
    measured, runners = measure_latency(measured, feed, warmup, iterations, log)
    measure_accuracy(measured, runners, model.config.data,
                     lambda: procedural_validation_samples(eval_images, tuple(input_size)), log,
                     eval_images)
    measure_throughput(measured, feed)
    return rows


def _calibration_once(source: str, data, input_size, count: int, seed: int, log):
    """() -> the calibration set, built on the first call only (and never when no row needs it)."""
    @functools.cache
    def calibration():
        log(f"building a {count}-image calibration set from {source}")
        return build_calibration_set(source, data, input_size, count, seed)

    return calibration


def collect_candidates(context: BenchmarkContext) -> list[Candidate]:
    """Every registered backend's rows, in registry order. A backend whose SDK is missing here
    gives one skipped row naming what to install."""
    candidates = []
    for backend in backends.BACKENDS:
        if backend.benchmark_candidates is None:
            continue
        try:
            candidates += backend.benchmark_candidates(context)
        except ImportError as missing:
            candidates.append(Candidate(backend.title, backend.name, "all",
                                        status=f"skipped: {missing}"))
    return candidates


def measure_latency(measured, feed: dict, warmup: int, iterations: int, log):
    """Latency of every (row, candidate) round-robin, with all runners active at once; rows whose
    precision hint this CPU does not honour are marked skipped instead. Returns the measured
    pairs and their (inactive again) runners."""
    runners = [candidate.make_runner() for _, candidate in measured]
    try:
        for runner in runners:
            runner.activate()
        measured, runners = _without_unhonoured_hints(measured, runners)
        log(f"measuring latency of {len(runners)} backends round-robin "
            f"({warmup} warm-up + {iterations} calls each)")
        stats = measure_interleaved(runners, feed, warmup, iterations)
        for (row, _), runner, latency in zip(measured, runners, stats):
            row.settings = runner.settings
            row.median_ms, row.p90_ms, row.p99_ms = (latency["median_ms"], latency["p90_ms"],
                                                      latency["p99_ms"])
            row.fps = 1000.0 / latency["mean_ms"]
    finally:
        for runner in runners:
            runner.deactivate()
    for row, _ in measured:
        row.speedup_vs_pytorch = measured[0][0].median_ms / row.median_ms
    return measured, runners


def measure_accuracy(measured, runners, data, samples, log, images: int | None = None) -> None:
    """mIoU of each row on the held-out scenes (``samples()``: ``images`` of them), and its pixel
    agreement with the first row's labels (PyTorch, the ground truth)."""
    reference_labels = None
    for (row, candidate), runner in zip(measured, runners):
        log(f"accuracy of {candidate.format} {candidate.precision}")
        labels: dict = {}
        with runner:
            metrics = evaluate_pipeline(SegmentationPipeline(runner, data), samples(),
                                        keep_labels(labels), reference_labels, images,
                                        f"accuracy of {candidate.format} {candidate.precision}")
        if reference_labels is None:
            reference_labels = labels
        row.miou = metrics["mIoU"]
        row.agreement_vs_pytorch = metrics.get("pixel_agreement", 1.0)


def measure_throughput(measured, feed: dict) -> None:
    """Frames per second of the rows that have a throughput mode (every parallel request busy);
    the others keep 1 / mean latency."""
    for row, candidate in measured:
        if candidate.throughput:
            runner = candidate.make_runner()
            runner.mode = "throughput"
            with heartbeat(f"throughput of {candidate.format} {candidate.precision}"), runner:
                row.fps = runner.throughput(feed)


def _without_unhonoured_hints(measured, runners):
    """Drop (and mark skipped) the rows whose runner computes in another precision than asked:
    OpenVINO runs the bf16 hint in f32 on CPUs without native bf16."""
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


@dataclass
class BenchmarkConfig:
    """A benchmark as ``deploy/benchmark.py`` asks for it."""

    output: Path  # benchmark.md, benchmark.json and the artifacts/ folder
    variant: str = BUNDLED_MODEL
    checkpoint: str | None = None  # default: the variant's bundled weights
    input_size: tuple[int, int] | None = None  # default: the variant's native size
    eval_images: int = 20
    iterations: int = 30
    warmup: int = 5
    calibration_source: str = PROCEDURAL
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    calibration_seed: int = 0
    threads: int | None = None  # default: PyTorch's thread count (ORT and OpenVINO: their own)
    all_formats: bool = False
    int8_targets: tuple[str, ...] = (DEFAULT_INT8_TARGET,)


def write_benchmark(config: BenchmarkConfig, log=print) -> str:
    """Run the benchmark ``config`` asks for and write ``benchmark.md`` and ``benchmark.json``
    into ``config.output``; returns the Markdown table. Bad input (variant, checkpoint, input
    size, calibration images) is a ValueError raised before anything is exported."""
    model = create_model(config.variant, checkpoint=config.checkpoint)
    size = check_export_size(model, config.input_size, config.calibration_images)
    # Unreadable calibration images would otherwise surface after minutes of exports.
    check_calibration_source(config.calibration_source, config.calibration_images,
                             config.calibration_seed)
    output = Path(config.output)
    rows = run_benchmark(
        model, size, output / "artifacts", eval_images=config.eval_images,
        iterations=config.iterations, warmup=config.warmup,
        calibration_images=config.calibration_images,
        calibration_source=config.calibration_source, calibration_seed=config.calibration_seed,
        threads=config.threads, log=log, all_formats=config.all_formats,
        int8_targets=config.int8_targets)
    title = benchmark_title(model.config.name, size, config.threads or torch.get_num_threads(),
                            config.eval_images)
    table = markdown_table(rows, title, cpu_notes())
    atomic_write(output / "benchmark.md", lambda tmp: Path(tmp).write_text(table))
    atomic_write(output / "benchmark.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"title": title, "cpu": host_cpu().as_dict(), "rows": rows_as_json(rows)}, indent=1,
        default=str)))
    return table


def benchmark_title(model_name: str, input_size, threads: int, eval_images: int) -> str:
    """The title of a benchmark, naming the CPU and its ISA: every timing depends on them."""
    return (f"{model_name} at {input_size[0]}x{input_size[1]}, batch 1, "
            f"{host_cpu().describe()}, {threads} threads, {eval_images} held-out scenes")


def cpu_notes() -> list[str]:
    """Where INT8 or bf16 cannot be fast on this CPU, said under the table."""
    note = host_cpu().int8_note()
    return [f"This CPU: {note}."] if note else []
