"""Run artifacts of any backend through the same preprocess -> runner -> postprocess path and
measure them against labels and against the FP32 PyTorch ground truth.

Per artifact: mIoU / per-class IoU / aAcc against the labels; against the ground truth: pixel
agreement, mIoU delta, the worst per-class IoU drop, logits max-abs and cosine (on the samples
whose reference logits are kept); latency median / p90 / p99 and throughput of the inference
calls; peak memory (growth of this process's resident set while the artifact is loaded and run);
artifact size. An artifact that cannot run here is a row with status ``skipped`` and the reason
(what hardware or package it needs); one that fails is ``error`` with the message.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.metadata import data_config_from_metadata
from lrformer_edge.artifacts.runner import unhonoured_hint
from lrformer_edge.backends import (
    BACKENDS,
    GROUND_TRUTH,
    backend_for,
    get_backend,
    load_runner,
    resolve_backend_options,
)
from lrformer_edge.backends.base import ArtifactDescription
from lrformer_edge.data.datasets import IGNORE_INDEX
from lrformer_edge.files import artifact_size_bytes
from lrformer_edge.metrics import ConfusionMatrix, count_nonfinite, logits_agreement
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.progress import track

SAMPLE_PANELS = 3  # images shown in the report


@dataclass
class BackendResult:
    name: str
    artifact: str
    backend: str
    precision: str
    status: str = "ok"  # ok | skipped | error
    reason: str = ""
    miou: float | None = None
    aacc: float | None = None
    per_class_iou: list[float | None] = field(default_factory=list)
    pixel_agreement: float | None = None
    miou_delta_points: float | None = None
    worst_class_drop: dict | None = None
    logits_max_abs: float | None = None
    logits_cosine: float | None = None
    logits_images: int = 0
    median_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    throughput_fps: float | None = None
    peak_memory_mib: float | None = None
    artifact_mib: float | None = None
    images: int = 0
    settings: dict = field(default_factory=dict)
    ground_truth: bool = False  # the reference's own row: shown, not gated
    nonfinite_logits: int = 0  # NaN/Inf values among the logits it produced: always a failure

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ValidationRun:
    class_names: list[str]
    palette: list
    samples: list  # (name, image, ground truth) of the first SAMPLE_PANELS samples
    results: list[BackendResult]
    predictions: list[dict]  # per result (same order): sample name -> labels, for the panels
    input_size: tuple[int, int]
    dataset: str
    seconds: float = 0.0


class _PeakMemory:
    """Peak resident set size of this process while active (Linux /proc; ru_maxrss elsewhere)."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as handle:
                import os

                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.rss()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def artifact_size_mib(path: Path) -> float | None:
    return artifact_size_bytes(path) / 2**20


def artifact_metadata_of(path: Path) -> dict | None:
    """The metadata an artifact embeds, without running it (None for PyTorch checkpoints)."""
    backend = backend_for(path)
    return backend.describe(path, backend.option_defaults()).metadata


def describe_artifact(path: Path, options: Mapping[str, Mapping] | None = None
                      ) -> ArtifactDescription:
    """Backend, precision key for the gate and runner options, read from the artifact;
    ``options``: runtime option values by backend name, the defaults for the rest."""
    backend = backend_for(path)
    return backend.describe(path, resolve_backend_options(options)[backend.name])


def reportable_precisions() -> dict[str, tuple[str, ...]]:
    """Gate key -> every precision key ``describe_artifact`` can report (the gate's vocabulary)."""
    known: dict[str, tuple[str, ...]] = {}
    for backend in BACKENDS:
        earlier = known.get(backend.gate_key, ())
        known[backend.gate_key] = earlier + tuple(p for p in backend.precision_keys
                                                  if p not in earlier)
    return known


def cpu_notes(settings: dict) -> str:
    """What the CPU changed about a run, from its runner's settings: a precision hint it could
    not honour (bf16 without native bf16) or an INT8 model made for other CPUs."""
    emulated = settings.get("int8_arithmetic") == "emulated exact" and (
        "exact int8 arithmetic emulated (what a VNNI/AMX CPU computes)")
    return "; ".join(filter(None, [unhonoured_hint(settings), settings.get("int8_warning"),
                                   emulated]))


def skip_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run here (the package or hardware it needs), or None."""
    return get_backend(backend).unavailable_reason()


def _worst_class_drop(reference_iou, iou, class_names) -> dict | None:
    drops = [(r - c, i) for i, (r, c) in enumerate(zip(reference_iou, iou))
             if r is not None and c is not None and not np.isnan(r) and not np.isnan(c)]
    if not drops:
        return None
    drop, index = max(drops)
    return {"class": class_names[index], "reference_iou": reference_iou[index],
            "iou": iou[index], "drop_points": 100 * drop}


def _nan_to_none(values) -> list:
    return [None if v is None or np.isnan(v) else float(v) for v in values]


def run_artifact(path: Path, samples: list, reference, reference_metrics: dict,
                 class_names, backend_options: Mapping[str, Mapping] | None = None
                 ) -> tuple[BackendResult, dict]:
    """One artifact against labels and the reference; never raises for the artifact's sake.
    ``backend_options``: runtime option values by backend name, e.g.
    ``{"openvino": {"precision": "bf16"}}``."""
    try:
        description = describe_artifact(path, backend_options)
    except Exception as error:  # an unreadable artifact is a result, not a crash
        return BackendResult(path.name, str(path), "unknown", "unknown", "error",
                             f"cannot open: {error}"), {}
    backend, precision = description.backend, description.precision
    result = BackendResult(f"{backend} {precision} ({path.name})", str(path), backend, precision,
                           artifact_mib=artifact_size_mib(path))
    reason = skip_reason(backend)
    if reason:
        result.status, result.reason = "skipped", reason
        return result, {}
    labels_by_name: dict = {}
    try:
        with _PeakMemory() as memory:
            runner = load_runner(path, **description.runner_options)
            pipeline = SegmentationPipeline(runner, data_config_from_metadata(runner.metadata))
            matrix = ConfusionMatrix(len(class_names), IGNORE_INDEX)
            agreements, max_abs, cosines, latency = [], [], [], []
            recorded = runner.metadata.get("checkpoint_sha256")
            expected = reference.model.get("checkpoint_sha256")
            if recorded and expected and recorded != expected:
                result.reason = (f"exported from checkpoint {str(recorded)[:12]}..., the ground "
                                 f"truth is {str(expected)[:12]}...")
            with pipeline:
                result.settings = dict(runner.settings)
                result.reason = "; ".join(filter(None, [result.reason,
                                                        cpu_notes(result.settings)]))
                for sample in track(samples, what="images", label=f"validating {path.name}"):
                    prediction = pipeline.predict(sample.image)
                    latency.append(1000 * prediction.inference_seconds)
                    matrix.update(sample.label, prediction.labels)
                    expected = reference.labels[sample.name]
                    agreements.append(float((expected == prediction.labels).mean()))
                    labels_by_name[sample.name] = prediction.labels
                    if prediction.logits is not None:
                        result.nonfinite_logits += count_nonfinite(prediction.logits)
                    kept = reference.logits.get(sample.name)
                    if kept is not None and prediction.logits is not None \
                            and kept.shape == prediction.logits.shape:
                        logits = logits_agreement(kept.astype(np.float32), prediction.logits)
                        max_abs.append(logits["max_abs"])
                        cosines.append(logits["cosine"])
        metrics = matrix.compute()
    except Exception as error:
        result.status = "error"
        result.reason = f"{type(error).__name__}: {error}"
        traceback.print_exc()
        return result, {}
    result.images = len(samples)
    result.miou, result.aacc = metrics["mIoU"], metrics["aAcc"]
    result.per_class_iou = _nan_to_none(metrics["IoU"])
    result.pixel_agreement = float(np.mean(agreements))
    result.miou_delta_points = 100 * (metrics["mIoU"] - reference_metrics["mIoU"])
    result.worst_class_drop = _worst_class_drop(_nan_to_none(reference_metrics["IoU"]),
                                                result.per_class_iou, class_names)
    if max_abs:
        result.logits_max_abs, result.logits_cosine = max(max_abs), min(cosines)
        result.logits_images = len(max_abs)
    _fill_latency(result, latency)
    result.peak_memory_mib = memory.growth_mib
    return result, labels_by_name


def _fill_latency(result: BackendResult, latency_ms: list[float]) -> None:
    if not latency_ms:
        return
    values = np.asarray(latency_ms)
    result.median_ms = float(np.median(values))
    result.p90_ms, result.p99_ms = (float(np.percentile(values, q)) for q in (90, 99))
    result.throughput_fps = 1000.0 * len(values) / float(values.sum())


def reference_result(reference, samples, class_names) -> tuple[BackendResult, dict]:
    """The ground truth's own row: its accuracy on the labels and its latency."""
    matrix = ConfusionMatrix(len(class_names), IGNORE_INDEX)
    for sample in samples:
        matrix.update(sample.label, reference.labels[sample.name])
    metrics = matrix.compute()
    backend, precision = GROUND_TRUTH.name, GROUND_TRUTH.precisions[0]
    row = BackendResult(f"{backend} {precision} (ground truth)",
                        reference.model.get("variant", "?"), backend, precision,
                        miou=metrics["mIoU"], aacc=metrics["aAcc"],
                        per_class_iou=_nan_to_none(metrics["IoU"]), pixel_agreement=1.0,
                        miou_delta_points=0.0, images=len(samples), ground_truth=True,
                        nonfinite_logits=sum(map(count_nonfinite, reference.logits.values())),
                        settings={"checkpoint_sha256": reference.model.get("checkpoint_sha256")})
    _fill_latency(row, reference.latency_ms)
    return row, metrics


def validate_artifacts(artifacts: list[Path], samples: list, reference, dataset: str,
                       class_names, palette,
                       backend_options: Mapping[str, Mapping] | None = None,
                       log=print) -> ValidationRun:
    start = time.time()
    reference.check_samples([s.name for s in samples])
    ground_truth, reference_metrics = reference_result(reference, samples, class_names)
    panel_names = [s.name for s in samples[:SAMPLE_PANELS]]
    results = [ground_truth]
    predictions = [{n: reference.labels[n] for n in panel_names}]
    for path in artifacts:
        log(f"validating {path}")
        result, labels = run_artifact(Path(path), samples, reference, reference_metrics,
                                      class_names, backend_options)
        results.append(result)
        predictions.append({n: labels[n] for n in panel_names if n in labels})
        log(f"  {result.status}" + (f": {result.reason}" if result.reason else
                                     f", mIoU {100 * result.miou:.2f}, agreement "
                                     f"{100 * result.pixel_agreement:.3f}%"))
    panels = [(s.name, s.image, s.label) for s in samples[:SAMPLE_PANELS]]
    return ValidationRun(list(class_names), [list(c) for c in palette], panels, results,
                         predictions, tuple(reference.input_size), dataset, time.time() - start)
