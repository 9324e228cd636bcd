"""Regression gate: thresholds per backend and precision from a versioned YAML file."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lrformer_edge.backends import get_backend
from lrformer_edge.validation.harness import reportable_precisions

DEFAULT_THRESHOLDS = Path(__file__).with_name("thresholds.yaml")
SUPPORTED_VERSIONS = (1,)
DEFAULT_PRECISION = "default"  # the limits of a backend's precisions that have no own entry
NO_LIMITS = "no limits"
NONFINITE = "non-finite logits"
# metric name -> (result attribute, "min" or "max", how to print the value)
METRICS = {
    "min_pixel_agreement": ("pixel_agreement", "min", "{:.5f}"),
    "max_miou_drop_points": ("miou_drop_points", "max", "{:.3f}"),
    "max_class_iou_drop_points": ("class_drop_points", "max", "{:.3f}"),
    "max_logits_max_abs": ("logits_max_abs", "max", "{:.3g}"),
    "min_logits_cosine": ("logits_cosine", "min", "{:.6f}"),
}


@dataclass
class Violation:
    result: str
    metric: str
    value: float | None
    limit: float

    reason: str = ""

    def __str__(self) -> str:
        if self.metric in ("error", "skipped", NO_LIMITS, NONFINITE):
            return f"{self.result}: {self.metric}: {self.reason}"
        if self.value is None:
            return f"{self.result}: {self.metric} could not be measured (limit {self.limit})"
        attribute, kind, fmt = METRICS[self.metric]
        relation = "<" if kind == "min" else ">"
        return (f"{self.result}: {attribute} {fmt.format(self.value)} {relation} limit "
                f"{fmt.format(self.limit)} ({self.metric})")


def load_thresholds(path: str | Path | None = None) -> dict:
    import yaml

    path = Path(path or DEFAULT_THRESHOLDS)
    if not path.is_file():
        raise ValueError(f"thresholds file {path} does not exist")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(document, dict) or document.get("version") not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: expected a mapping with 'version' in {SUPPORTED_VERSIONS} "
                         f"and 'backends'; got version {document.get('version') if isinstance(document, dict) else None}")
    _check_keys(document, {"version", "backends"}, str(path))
    backends = document.get("backends")
    if not isinstance(backends, dict) or not backends:
        raise ValueError(f"{path}: 'backends' must map backend names to their limits")
    for backend, precisions in backends.items():
        _check_backend(backend, precisions, path)
    # Where the limits came from, for messages ("no limits for ... in FILE").
    return {**document, "path": str(path)}


def _check_keys(mapping: dict, known, where: str) -> None:
    unknown = sorted(str(k) for k in mapping if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected one of {sorted(known)}")


def _check_backend(backend, precisions, path: Path) -> None:
    """A typo'd backend or precision would match no artifact and gate nothing: refuse it."""
    known = reportable_precisions()
    if backend not in known:
        raise ValueError(f"{path}: unknown backend {backend!r} under 'backends'; known: "
                         f"{', '.join(known)}")
    if not isinstance(precisions, dict) or not precisions:
        raise ValueError(f"{path}: backends.{backend} must map precisions to limits")
    allowed = (*known[backend], DEFAULT_PRECISION)
    for precision, limits in precisions.items():
        where = f"{path}: backends.{backend}.{precision}"
        if precision not in allowed:
            raise ValueError(f"{path}: unknown precision {precision!r} for backend {backend}; "
                             f"known: {', '.join(allowed)}")
        if not isinstance(limits, dict) or not limits:
            raise ValueError(f"{where} must map metrics to limits, got {limits!r}")
        unknown = set(limits) - set(METRICS)
        if unknown:
            raise ValueError(f"{where} has unknown metrics {sorted(unknown)}; known: "
                             f"{sorted(METRICS)}")
        for metric, limit in limits.items():
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) \
                    or not math.isfinite(limit):
                raise ValueError(f"{where}.{metric} must be a finite number, got {limit!r}")


def limits_for(thresholds: dict, backend: str, precision: str) -> dict:
    """The limits of a result's backend (by name) and precision; {} where the file has none."""
    precisions = (thresholds.get("backends") or {}).get(get_backend(backend).gate_key) or {}
    return dict(precisions.get(precision) or precisions.get(DEFAULT_PRECISION) or {})


def _value(result, attribute: str):
    if attribute == "miou_drop_points":
        return None if result.miou_delta_points is None else -result.miou_delta_points
    if attribute == "class_drop_points":
        drop = result.worst_class_drop
        return None if drop is None else drop["drop_points"]
    return getattr(result, attribute)


def check(results, thresholds: dict, require_all: bool = False) -> list[Violation]:
    """Violations of every ok result; errors always fail, skips only with ``require_all``."""
    violations = []
    for result in results:
        if result.status == "error" or (result.status == "skipped" and require_all):
            violations.append(Violation(f"{result.name} ({result.artifact})", result.status, None,
                                        float("nan"), result.reason))
            continue
        if result.status != "ok" or result.ground_truth:
            continue
        limits = limits_for(thresholds, result.backend, result.precision)
        if not limits:  # unlimited is not "passed": the file must say what this artifact may do
            key = get_backend(result.backend).gate_key
            violations.append(Violation(
                result.name, NO_LIMITS, None, float("nan"),
                f"no limits are defined for backend {key} precision "
                f"{result.precision} in {thresholds.get('path', 'the thresholds')} (add "
                f"backends.{key}.{result.precision} or .{DEFAULT_PRECISION})"))
            continue
        for metric, limit in limits.items():
            attribute, kind, _ = METRICS[metric]
            value = _value(result, attribute)
            if value is None:
                if attribute.startswith("logits"):
                    continue  # other input size than the reference: not comparable, not a failure
                violations.append(Violation(result.name, metric, None, limit))
            elif (value != value or (kind == "min" and value < limit)  # NaN passes no limit
                  or (kind == "max" and value > limit)):
                violations.append(Violation(result.name, metric, value, limit))
    return nonfinite_violations(results) + violations


def nonfinite_violations(results) -> list[Violation]:
    """Rows whose logits hold NaN/Inf, the ground truth's included: they fail whatever the
    thresholds say (NaN compares false with every limit, and all-NaN logits agree everywhere)."""
    return [Violation(result.name, NONFINITE, result.nonfinite_logits, 0,
                      f"{result.nonfinite_logits} NaN/Inf values in its logits")
            for result in results if result.status == "ok" and result.nonfinite_logits]
