"""Picking the layers to keep in higher precision from a sensitivity ranking, and the size model.

* ``--max-drop P`` / ``--min-agreement A``: the smallest k such that raising the ranking's top
  k layers (``RAISED_PRECISION``: int8 -> float, weight-only -> int8) meets the bound, found by
  binary search over k and verified by measurement: the combined model (top k raised, every
  other layer quantized) is scored on the held-out images; the chosen k meets the bound and
  k - 1 does not (both measured).
* ``--max-size-mib S`` (weight-only schemes): layers are upgraded from 4 bits to int8, most
  sensitive per added byte first, while the modelled size stays within S; the result is
  measured too.

The size model (``SizeModel``, ``SIZE_MODEL``) sizes the artifact of the backend that applies
the scheme and declares how it stores layer weights (``fake_quant.weight_storage``: Core ML):
each layer's weights by that backend's own rule (``Backend.weight_bytes``), plus every other
parameter at fp16. What it leaves out (the package's program, per-tensor headers) is stated in
``SIZE_MODEL``.

``top_k_config(rankings, scheme, k)`` turns a ranking into the precision config of its top k.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lrformer_edge.artifacts.precision_config import (
    FLOAT,
    SCHEMES,
    WEIGHT_ONLY_SCHEMES,
    PrecisionConfig,
)
from lrformer_edge.models.layers import Layer
from lrformer_edge.quant.fake_quant import RAISED_PRECISION, scheme_precisions, weight_storage
from lrformer_edge.quant.staged_evaluation import CaseScore

MIB = 2 ** 20
SIZE_MODEL = ("each layer's weights as the artifact of the scheme's backend stores them (its "
              "own rule; Core ML: a 16-entry fp16 look-up table per 16 output channels for "
              "palette4, an fp16 scale per output channel for int8 and int4, fp16 where it "
              "leaves a layer uncompressed) + every other parameter at fp16. Not modelled: the "
              "package's program (model.mlmodel) and the 64-byte header of each stored tensor: "
              "a compressed LRFormer-T package at 512x512 is 0.58 MiB above its modelled size "
              "(lrformer-test at 64x64: 0.24 MiB)")


# ----------------------------------------------------------------------------- bounds
@dataclass(frozen=True)
class Criterion:
    name: str  # as on the command line, without "--"
    metavar: str
    schemes: tuple[str, ...]  # the schemes it can select for
    help: str


CRITERIA = {
    "max-drop": Criterion("max-drop", "P", SCHEMES,
                          "the mIoU drop vs FP32 on the held-out images, in points, at most P"),
    "min-agreement": Criterion("min-agreement", "A", SCHEMES,
                               "the pixel agreement with FP32, in percent, at least A"),
    "max-size-mib": Criterion("max-size-mib", "S", WEIGHT_ONLY_SCHEMES,
                              "the modelled package size in MiB (layer weights as the backend "
                              "stores them + other parameters), at most S: upgrades layers "
                              "from 4 bits to int8 within that budget"),
}


@dataclass(frozen=True)
class Bound:
    criterion: str  # a key of CRITERIA
    value: float

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown bound {self.criterion!r}; one of {', '.join(CRITERIA)}")
        if not self.value >= 0 or self.value == float("inf"):
            raise ValueError(f"--{self.criterion} must be a finite number >= 0, got {self.value}")
        if self.criterion == "min-agreement" and self.value > 100:
            raise ValueError(f"--min-agreement is a percentage, at most 100, got {self.value}")

    def applies_to(self, scheme: str) -> bool:
        return scheme in CRITERIA[self.criterion].schemes

    def met(self, score: CaseScore, size_mib: float) -> bool:
        if self.criterion == "max-drop":
            return -score.miou_delta_points <= self.value
        if self.criterion == "min-agreement":
            return 100 * score.agreement >= self.value
        return size_mib <= self.value

    def describe(self) -> str:
        return f"--{self.criterion} {self.value:g}"


def check_bound(bound: Bound | None, schemes,
                size_models: Mapping[str, SizeModel] | None = None) -> None:
    """Refuse, before any measurement, a bound no chosen scheme can select for, or a size
    budget below what a scheme reaches with every layer at its lowest precision
    (``size_models``: scheme -> its ``SizeModel``)."""
    if bound is None:
        return
    applicable = [scheme for scheme in schemes if bound.applies_to(scheme)]
    if not applicable:
        raise ValueError(f"{bound.describe()} selects layers for the scheme(s) "
                         f"{', '.join(CRITERIA[bound.criterion].schemes)} only; add one with "
                         f"--scheme (given: {', '.join(schemes)})")
    if bound.criterion == "max-size-mib" and size_models is not None:
        for scheme in applicable:
            smallest = size_models[scheme].scheme_mib()
            if smallest > bound.value:
                raise ValueError(f"{bound.describe()} is below the smallest {scheme} model "
                                 f"({smallest:.2f} MiB with every layer at its lowest "
                                 f"precision); give at least {smallest:.2f}")


# ----------------------------------------------------------------------------- size model
@dataclass(frozen=True)
class SizeModel:
    """The modelled artifact size of one scheme's backend (``SIZE_MODEL``)."""

    scheme: str
    layers: tuple[Layer, ...]
    other_parameters: int  # parameter elements outside the layers' weights, stored fp16
    weight_bytes: Callable  # the backend's ``Backend.weight_bytes``
    artifact: str  # what is sized, in words (the backend's title)

    @classmethod
    def of(cls, model, layers: tuple[Layer, ...], scheme: str) -> SizeModel:
        storage = weight_storage(scheme)
        if storage is None:
            raise ValueError(f"no backend that applies {scheme} declares how it stores layer "
                             f"weights (Backend.weight_bytes), so its size cannot be modelled")
        total = sum(parameter.numel() for parameter in model.parameters())
        return cls(scheme, tuple(layers), total - sum(layer.weight_elements for layer in layers),
                   storage.weight_bytes, storage.title)

    def scheme_assignment(self) -> dict[str, str]:
        return scheme_precisions(self.layers, self.scheme)

    def other_bytes(self) -> int:
        return 2 * self.other_parameters

    def bytes(self, assignment: Mapping[str, str]) -> int:
        """Layers not in ``assignment`` are float."""
        return self.other_bytes() + self.weight_bytes(
            self.layers, lambda name: assignment.get(name, FLOAT))

    def layer_bytes(self, layer: Layer, precision: str) -> int:
        return self.weight_bytes((layer,), lambda _: precision)

    def mib(self, assignment: Mapping[str, str]) -> float:
        return self.bytes(assignment) / MIB

    def scheme_mib(self) -> float:
        """Every layer at its lowest precision under the scheme."""
        return self.mib(self.scheme_assignment())


# ----------------------------------------------------------------------------- selection
@dataclass
class Selection:
    scheme: str
    bound: Bound
    raised: list[str]  # layers raised above the scheme, in the order they were chosen
    precision: str  # what they were raised to
    met: bool
    score: CaseScore  # measured on the held-out images, every other layer quantized
    size_mib: float
    trace: list[dict] = field(default_factory=list)  # every k measured on the way
    float_gmacs: float | None = None  # multiply-accumulates per image of the raised layers
    float_gmacs_budget: float | None = None  # --max-float-gmacs, when given

    @property
    def k(self) -> int:
        return len(self.raised)

    def as_dict(self) -> dict:
        return {"scheme": self.scheme, "criterion": self.bound.criterion,
                "bound": self.bound.value, "k": self.k, "raised_to": self.precision,
                "raised": list(self.raised), "met": self.met, "score": self.score.as_dict(),
                "size_mib": self.size_mib, "trace": self.trace,
                "float_gmacs": self.float_gmacs, "float_gmacs_budget": self.float_gmacs_budget}


def within_compute_budget(ranking: list[str], macs: Mapping[str, int],
                          budget_gmacs: float) -> list[str]:
    """The ranking with the layers left out that would take the multiply-accumulates kept in
    float (per image) over ``budget_gmacs``: walking down the ranking, a layer is kept while the
    running total fits (a latency budget: float layers run slower than int8 ones)."""
    kept, used = [], 0
    for name in ranking:
        if used + macs[name] <= budget_gmacs * 1e9:
            kept.append(name)
            used += macs[name]
    return kept


# score(assignment) -> CaseScore: the measurement of a whole assignment
Scorer = Callable[[Mapping[str, str]], CaseScore]


def raised_assignment(base: Mapping[str, str], raised, precision: str) -> dict[str, str]:
    return {**base, **{name: precision for name in raised}}


def select_smallest(scorer: Scorer, scheme: str, base: Mapping[str, str], ranking: list[str],
                    everything: CaseScore, bound: Bound, size_model: SizeModel) -> Selection:
    """The smallest top-k of ``ranking`` whose raising meets ``bound`` (binary search over k,
    each k measured; ``everything``: the score of k = 0)."""
    precision = RAISED_PRECISION[scheme]
    trace: dict[int, CaseScore] = {0: everything}

    def measure(k: int) -> CaseScore:
        if k not in trace:
            trace[k] = scorer(raised_assignment(base, ranking[:k], precision))
        return trace[k]

    def meets(k: int) -> bool:
        size = size_model.mib(raised_assignment(base, ranking[:k], precision))
        return bound.met(measure(k), size)

    low, high = 0, len(ranking)
    met = meets(low)
    if met:
        high = low
    elif meets(high):
        met = True
        while high - low > 1:  # meets(high) and not meets(low)
            middle = (low + high) // 2
            if meets(middle):
                high = middle
            else:
                low = middle
    chosen = ranking[:high]
    assignment = raised_assignment(base, chosen, precision)
    return Selection(scheme, bound, list(chosen), precision, met, measure(high),
                     size_model.mib(assignment), _trace(trace))


def select_within_size(scorer: Scorer, scheme: str, base: Mapping[str, str],
                       sensitivity: Mapping[str, float], bound: Bound,
                       size_model: SizeModel) -> Selection:
    """Upgrade layers to ``RAISED_PRECISION`` most sensitive per added byte first while the
    modelled size stays within the bound (``sensitivity``: layer -> a measure of the error it
    adds, larger is worse); the result is measured."""
    precision = RAISED_PRECISION[scheme]
    layers = {layer.name: layer for layer in size_model.layers}

    def added_bytes(name: str) -> int:
        return (size_model.layer_bytes(layers[name], precision)
                - size_model.layer_bytes(layers[name], base[name]))

    order = sorted(sensitivity, key=lambda name: sensitivity[name] / added_bytes(name),
                   reverse=True)
    budget = bound.value * MIB
    size = size_model.bytes(base)
    raised = []
    for name in order:
        if size + added_bytes(name) <= budget:
            raised.append(name)
            size += added_bytes(name)
    assignment = raised_assignment(base, raised, precision)
    score = scorer(assignment)
    size_mib = size_model.mib(assignment)
    return Selection(scheme, bound, raised, precision, bound.met(score, size_mib), score,
                     size_mib, _trace({len(raised): score}))


def _trace(scores: Mapping[int, CaseScore]) -> list[dict]:
    return [{"k": k, "agreement": s.agreement, "miou_delta_points": s.miou_delta_points,
             "kl": s.kl} for k, s in sorted(scores.items())]


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Rankings:
    """What a sensitivity run ranked, per scheme, for the model it measured (the part of
    ``sensitivity.json`` that configs are made from)."""

    variant: str
    checkpoint_sha256: str
    input_size: tuple[int, int]
    orders: Mapping[str, tuple[str, ...]]  # scheme -> layers, most sensitive first
    kept: Mapping[str, Mapping[str, str]]  # scheme -> layers at a fixed precision (rule)

    def to_dict(self) -> dict:
        return {"variant": self.variant, "checkpoint_sha256": self.checkpoint_sha256,
                "input_size": list(self.input_size),
                "orders": {s: list(order) for s, order in self.orders.items()},
                "kept": {s: dict(kept) for s, kept in self.kept.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> Rankings:
        return cls(data["variant"], data["checkpoint_sha256"], tuple(data["input_size"]),
                   {s: tuple(order) for s, order in data["orders"].items()},
                   {s: dict(kept) for s, kept in data["kept"].items()})

    @classmethod
    def load(cls, path: str | Path) -> Rankings:
        """The rankings of a ``sensitivity.json``."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text())["rankings"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a sensitivity.json written by "
                             f"calibration/sensitivity.py ({error})") from None


def top_k_config(rankings: Rankings, scheme: str, k: int,
                 selection: Mapping | None = None) -> PrecisionConfig:
    """The precision config that raises the top ``k`` layers of ``scheme``'s ranking to
    ``RAISED_PRECISION[scheme]`` (k = 0: the plain scheme), with the scheme's fixed rules."""
    if scheme not in rankings.orders:
        raise ValueError(f"the sensitivity run ranked {', '.join(rankings.orders)}, not {scheme}")
    order = rankings.orders[scheme]
    if not 0 <= k <= len(order):
        raise ValueError(f"k must lie in 0..{len(order)} (the {scheme} ranking), got {k}")
    overrides = {**rankings.kept[scheme],
                 **{name: RAISED_PRECISION[scheme] for name in order[:k]}}
    return PrecisionConfig(scheme, overrides, rankings.variant, rankings.checkpoint_sha256,
                           rankings.input_size, dict(selection or {"k": k}))


def selection_config(rankings: Rankings, selection: Selection, images: int,
                     report: str) -> PrecisionConfig:
    """The config of a ``Selection`` (its layers need not be a top k: a size budget skips)."""
    scheme = selection.scheme
    overrides = {**rankings.kept[scheme],
                 **{name: selection.precision for name in selection.raised}}
    record = {"criterion": selection.bound.criterion, "bound": selection.bound.value,
              "k": selection.k, "bound_met": selection.met,
              "predicted_agreement": selection.score.agreement,
              "predicted_miou": selection.score.miou,
              "predicted_miou_delta_points": selection.score.miou_delta_points,
              "predicted_size_mib": selection.size_mib, "size_model": SIZE_MODEL,
              "float_gmacs": selection.float_gmacs,
              "max_float_gmacs": selection.float_gmacs_budget,
              "images": images, "report": report}
    return PrecisionConfig(scheme, overrides, rankings.variant, rankings.checkpoint_sha256,
                           rankings.input_size, record)
