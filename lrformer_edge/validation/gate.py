"""Regression gate: thresholds per backend and precision from a versioned YAML file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_THRESHOLDS = Path(__file__).with_name("thresholds.yaml")
SUPPORTED_VERSIONS = (1,)
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
        if self.metric in ("error", "skipped"):
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
    for backend, precisions in (document.get("backends") or {}).items():
        for precision, limits in (precisions or {}).items():
            unknown = set(limits or {}) - set(METRICS)
            if unknown:
                raise ValueError(f"{path}: {backend}.{precision} has unknown metrics "
                                 f"{sorted(unknown)}; known: {sorted(METRICS)}")
    return document


def limits_for(thresholds: dict, backend: str, precision: str) -> dict:
    precisions = (thresholds.get("backends") or {}).get(backend) or {}
    return dict(precisions.get(precision) or precisions.get("default") or {})


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
        if result.status != "ok":
            continue
        for metric, limit in limits_for(thresholds, result.backend, result.precision).items():
            attribute, kind, _ = METRICS[metric]
            value = _value(result, attribute)
            if value is None:
                if attribute.startswith("logits"):
                    continue  # other input size than the reference: not comparable, not a failure
                violations.append(Violation(result.name, metric, None, limit))
            elif (kind == "min" and value < limit) or (kind == "max" and value > limit):
                violations.append(Violation(result.name, metric, value, limit))
    return violations
