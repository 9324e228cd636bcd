"""The speed/accuracy front of a sensitivity ranking, per backend: the artifact that keeps the
k most sensitive layers in higher precision, for k = 0, 1, 2, 4, 8..., exported by the backend
itself (``Backend.export_mixed``) and measured through the validation harness against the same
FP32 ground truth: pixel agreement, mIoU and latency where the backend runs here; package size
and the accuracy of its PyTorch proxy where it does not (Core ML off macOS).

A user reads the front to pick a point, then exports it with ``--precision-config``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lrformer_edge.backends import BACKENDS, backend_for
from lrformer_edge.backends.base import Backend
from lrformer_edge.evaluation import evaluate_pipeline
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.validation.harness import artifact_size_mib, reference_result, run_artifact

FRONT_KS = (0, 1, 2, 4, 8, 16)


@dataclass
class FrontPoint:
    backend: str
    scheme: str
    k: int  # layers raised above the scheme (the k most sensitive of the ranking)
    status: str = "ok"  # ok | error
    reason: str = ""
    artifact: str | None = None
    size_mib: float | None = None
    median_ms: float | None = None  # None where only a proxy ran
    agreement: float | None = None
    miou: float | None = None
    miou_delta_points: float | None = None
    measured_by: str = ""  # the backend whose runner ran it, or "proxy"

    def as_dict(self) -> dict:
        return asdict(self)


def front_backends(schemes: Sequence[str], names: Sequence[str] | None = None
                   ) -> list[tuple[Backend, str]]:
    """(backend, scheme) for every registered backend that exports precision configs of one of
    ``schemes`` (its lowest such scheme), restricted to ``names`` when given; an unknown or
    unsuitable name is a ValueError naming those that qualify."""
    suitable = []
    for backend in BACKENDS:
        usable = [s for s in backend.precision_schemes if s in schemes]
        if backend.export_mixed is not None and usable:
            suitable.append((backend, usable[0]))
    if names is None:
        return suitable
    known = {backend.name: (backend, scheme) for backend, scheme in suitable}
    wrong = [name for name in names if name not in known]
    if wrong:
        raise ValueError(f"no front for {', '.join(wrong)}: fronts exist for the backends that "
                         f"export a precision config of the measured schemes "
                         f"({', '.join(schemes)}): {', '.join(known) or 'none'}")
    return [known[name] for name in names]


def measure_front(model, input_size, backend: Backend, scheme: str,
                  config_for_k: Callable[[int], object], samples, reference, class_names,
                  work_dir: Path, calibration=None, ks: Sequence[int] = FRONT_KS,
                  log=print) -> list[FrontPoint]:
    """One backend's front: for each k, ``config_for_k(k)`` (a ``PrecisionConfig``) exported
    into ``work_dir`` and measured on ``samples`` against ``reference`` (the ground truth's
    ``ReferenceOutputs`` on those samples). A point whose export fails is recorded as an error
    and the front goes on."""
    _, reference_metrics = reference_result(reference, samples, class_names)
    points = []
    for k in ks:
        point = FrontPoint(backend.name, scheme, k)
        log(f"front {backend.name} {scheme}: k = {k}")
        try:
            folder = Path(work_dir) / f"{backend.name}-{scheme}-k{k}"
            folder.mkdir(parents=True, exist_ok=True)
            result = backend.export_mixed(model, folder, tuple(input_size), config_for_k(k),
                                          calibration if scheme == "int8" else None)
            point.artifact, point.size_mib = str(result.path), artifact_size_mib(result.path)
            runs_it = backend_for(result.path)  # e.g. ONNX Runtime for the TensorRT Q/DQ ONNX
            if runs_it.unavailable_reason() is None:
                _measure_runtime(point, result.path, samples, reference, reference_metrics,
                                 class_names)
                point.measured_by = runs_it.name
            elif backend.proxy_model is not None:
                _measure_proxy(point, backend.proxy_model(model, result.path, calibration),
                               samples, reference, reference_metrics, input_size)
            else:
                point.status, point.reason = "error", runs_it.unavailable_reason()
        except Exception as error:  # one failed point is a result, not the end of the front
            point.status, point.reason = "error", f"{type(error).__name__}: {error}"
        log(f"  {describe_point(point)}")
        points.append(point)
    return points


def _measure_runtime(point, path, samples, reference, reference_metrics, class_names) -> None:
    row, _ = run_artifact(Path(path), samples, reference, reference_metrics, class_names)
    if row.status != "ok":
        point.status, point.reason = row.status, row.reason
        return
    point.median_ms, point.agreement = row.median_ms, row.pixel_agreement
    point.miou, point.miou_delta_points = row.miou, row.miou_delta_points


def _measure_proxy(point, proxy, samples, reference, reference_metrics, input_size) -> None:
    pipeline = SegmentationPipeline.from_model(proxy, tuple(input_size))
    with pipeline:
        result = evaluate_pipeline(pipeline, samples, reference_labels=reference.labels,
                                   label=f"proxy of {Path(point.artifact).name}")
    point.measured_by = "proxy"
    point.agreement, point.miou = result["pixel_agreement"], result["mIoU"]
    point.miou_delta_points = 100 * (result["mIoU"] - reference_metrics["mIoU"])


def describe_point(point: FrontPoint) -> str:
    if point.status != "ok":
        return f"k={point.k}: {point.status}: {point.reason}"
    latency = f", median {point.median_ms:.1f} ms" if point.median_ms is not None else ""
    return (f"k={point.k}: agreement {100 * point.agreement:.3f}%, mIoU {100 * point.miou:.2f} "
            f"({point.miou_delta_points:+.2f}), {point.size_mib:.1f} MiB{latency}"
            f" ({'PyTorch proxy' if point.measured_by == 'proxy' else point.measured_by})")


def run_fronts(model, input_size, rankings, backend_names: Sequence[str] | None, images: int,
               work_dir: Path, calibration=None, ks: Sequence[int] = FRONT_KS, data=None,
               log=print) -> list[FrontPoint]:
    """Every asked backend's front for ``rankings`` (``quant.selection.Rankings`` of a
    sensitivity run on this model and size) on ``images`` held-out scenes (``data``: a dataset
    root's val split instead), against one FP32 ground truth computed once.
    ``calibration``: the set int8 exports calibrate on (None when no int8 front is asked)."""
    from lrformer_edge.evaluation import load_samples
    from lrformer_edge.quant.selection import top_k_config
    from lrformer_edge.validation.reference import compute_reference

    pairs = front_backends(tuple(rankings.orders), backend_names)
    longest = min(len(order) for order in rankings.orders.values())
    bad = [k for k in ks if not 0 <= k <= longest]
    if bad:
        raise ValueError(f"front points k must lie in 0..{longest} (ranked layers), got {bad}")
    samples, _ = load_samples(data, images, tuple(input_size))
    reference = compute_reference(model, samples, input_size)
    class_names = model.config.data.class_names
    points = []
    for backend, scheme in pairs:
        points += measure_front(
            model, input_size, backend, scheme,
            lambda k, scheme=scheme: top_k_config(rankings, scheme, k, {"k": k, "front": True}),
            samples, reference, class_names, work_dir, calibration, ks, log)
    return points


def needs_calibration(rankings, backend_names: Sequence[str] | None) -> bool:
    return any(scheme == "int8" for _, scheme in
               front_backends(tuple(rankings.orders), backend_names))
