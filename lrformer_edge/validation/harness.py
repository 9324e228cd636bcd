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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lrformer_edge.data.datasets import IGNORE_INDEX
from lrformer_edge.metrics import ConfusionMatrix, count_nonfinite, logits_agreement

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
    from lrformer_edge.files import artifact_size_bytes

    return artifact_size_bytes(path) / 2**20


def artifact_metadata_of(path: Path) -> dict | None:
    """The metadata an artifact embeds, without running it (None for PyTorch checkpoints)."""
    from lrformer_edge.backends import TENSORRT_SUFFIXES, TORCH_SUFFIXES, load_runner

    if path.suffix in TORCH_SUFFIXES:
        return None
    if path.suffix in TENSORRT_SUFFIXES:
        from lrformer_edge.artifacts.metadata import decode_metadata
        from lrformer_edge.backends.tensorrt.sidecar import read_sidecar

        return decode_metadata(read_sidecar(path)["metadata"])
    return load_runner(path).metadata


def describe_artifact(path: Path, openvino_precision: str = "f32",
                      emulate_exact_int8: bool = False) -> tuple[str, str, dict]:
    """(backend, precision key for the gate, runner options) read from the artifact."""
    from lrformer_edge.backends import TENSORRT_SUFFIXES, TORCH_SUFFIXES, load_runner

    if path.suffix in TORCH_SUFFIXES:
        return "pytorch", "fp32", {}
    if path.suffix == ".mlpackage":
        options = (load_runner(path).metadata.get("coreml_options") or {})
        return "coreml", coreml_precision_key(options.get("precision", "fp16"),
                                              options.get("weights", "float"),
                                              bool(options.get("w8a8"))), {}
    if path.suffix in TENSORRT_SUFFIXES:
        from lrformer_edge.backends.tensorrt.sidecar import read_sidecar

        return "tensorrt", read_sidecar(path).get("precision", "fp32"), {}
    runner = load_runner(path)
    metadata = runner.metadata
    if runner.backend == "openvino":
        precision = openvino_precision_key(metadata.get("weights_precision", "fp32"),
                                           openvino_precision)
        return "openvino", precision, {"precision": openvino_precision,
                                       "emulate_exact_int8": emulate_exact_int8}
    return runner.backend, metadata.get("precision", "fp32"), {}


def openvino_precision_key(weights: str, hint: str) -> str:
    """IR weights, plus the inference hint when it is not f32: "int8", "int8+bf16"."""
    return weights if hint == "f32" else f"{weights}+{hint}"


def coreml_precision_key(precision: str, weights: str, w8a8: bool) -> str:
    """Compute precision (or "w8a8"), plus compressed weights: "fp16", "fp16+int8", "w8a8"."""
    compute = "w8a8" if w8a8 else precision
    return compute if weights == "float" else f"{compute}+{weights}"


def reportable_precisions() -> dict[str, tuple[str, ...]]:
    """backend -> every precision key ``describe_artifact`` can report (the gate's vocabulary)."""
    from lrformer_edge.backends.coreml.export import PRECISIONS as COREML_PRECISIONS
    from lrformer_edge.backends.coreml.export import WEIGHT_MODES
    from lrformer_edge.backends.openvino.ir import IR_PRECISIONS
    from lrformer_edge.backends.openvino.runner import PRECISIONS as OPENVINO_HINTS
    from lrformer_edge.backends.tensorrt.export import TRT_PRECISIONS

    coreml = [coreml_precision_key(p, w, False) for p in COREML_PRECISIONS for w in WEIGHT_MODES]
    coreml += [coreml_precision_key("fp16", w, True) for w in WEIGHT_MODES if w != "palette4"]
    return {
        "pytorch": ("fp32",),
        # ONNX files record their precision: fp32 exports, the TensorRT-ready fp16/int8 ONNX.
        "onnxruntime": TRT_PRECISIONS,
        "openvino": tuple(openvino_precision_key(w, h) for w in IR_PRECISIONS
                          for h in OPENVINO_HINTS),
        "tensorrt": TRT_PRECISIONS,
        "coreml": tuple(coreml),
    }


def cpu_notes(settings: dict) -> str:
    """What the CPU changed about a run, from its runner's settings: a precision hint it could
    not honour (bf16 without native bf16) or an INT8 model made for other CPUs."""
    from lrformer_edge.artifacts.runner import unhonoured_hint

    emulated = settings.get("int8_arithmetic") == "emulated exact" and (
        "exact int8 arithmetic emulated (what a VNNI/AMX CPU computes)")
    return "; ".join(filter(None, [unhonoured_hint(settings), settings.get("int8_warning"),
                                   emulated]))


def skip_reason(backend: str) -> str | None:
    if backend == "tensorrt":
        from lrformer_edge.backends.tensorrt.engine import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        return f"needs TensorRT and an NVIDIA GPU: {reason}" if reason else None
    if backend == "coreml":
        from lrformer_edge.backends.coreml.runner import coreml_unavailable_reason

        return coreml_unavailable_reason()
    return None


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
                 class_names, openvino_precision: str = "f32",
                 emulate_exact_int8: bool = False) -> tuple[BackendResult, dict]:
    """One artifact against labels and the reference; never raises for the artifact's sake."""
    from lrformer_edge.backends import load_runner
    from lrformer_edge.pipeline import SegmentationPipeline

    try:
        backend, precision, options = describe_artifact(path, openvino_precision,
                                                        emulate_exact_int8)
    except Exception as error:  # an unreadable artifact is a result, not a crash
        return BackendResult(path.name, str(path), "unknown", "unknown", "error",
                             f"cannot open: {error}"), {}
    result = BackendResult(f"{backend} {precision} ({path.name})", str(path), backend, precision,
                           artifact_mib=artifact_size_mib(path))
    reason = skip_reason(backend)
    if reason:
        result.status, result.reason = "skipped", reason
        return result, {}
    labels_by_name: dict = {}
    try:
        with _PeakMemory() as memory:
            runner = load_runner(path, **options)
            from lrformer_edge.artifacts.metadata import data_config_from_metadata

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
                for sample in samples:
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
    row = BackendResult("pytorch fp32 (ground truth)", reference.model.get("variant", "?"),
                        "pytorch", "fp32", miou=metrics["mIoU"], aacc=metrics["aAcc"],
                        per_class_iou=_nan_to_none(metrics["IoU"]), pixel_agreement=1.0,
                        miou_delta_points=0.0, images=len(samples), ground_truth=True,
                        nonfinite_logits=sum(map(count_nonfinite, reference.logits.values())),
                        settings={"checkpoint_sha256": reference.model.get("checkpoint_sha256")})
    _fill_latency(row, reference.latency_ms)
    return row, metrics


def validate_artifacts(artifacts: list[Path], samples: list, reference, dataset: str,
                       class_names, palette, openvino_precision: str = "f32",
                       log=print, emulate_exact_int8: bool = False) -> ValidationRun:
    start = time.time()
    reference.check_samples([s.name for s in samples])
    ground_truth, reference_metrics = reference_result(reference, samples, class_names)
    panel_names = [s.name for s in samples[:SAMPLE_PANELS]]
    results = [ground_truth]
    predictions = [{n: reference.labels[n] for n in panel_names}]
    for path in artifacts:
        log(f"validating {path}")
        result, labels = run_artifact(Path(path), samples, reference, reference_metrics,
                                      class_names, openvino_precision, emulate_exact_int8)
        results.append(result)
        predictions.append({n: labels[n] for n in panel_names if n in labels})
        log(f"  {result.status}" + (f": {result.reason}" if result.reason else
                                     f", mIoU {100 * result.miou:.2f}, agreement "
                                     f"{100 * result.pixel_agreement:.3f}%"))
    panels = [(s.name, s.image, s.label) for s in samples[:SAMPLE_PANELS]]
    return ValidationRun(list(class_names), [list(c) for c in palette], panels, results,
                         predictions, tuple(reference.input_size), dataset, time.time() - start)
