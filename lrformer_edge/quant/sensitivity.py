"""Per-layer sensitivity to quantization, per scheme, measured on the deploy form in PyTorch.

For each scheme (``int8``, ``weights-int4``, ``palette4``; ``fake_quant.py`` says what each does
to a layer) and on a few held-out labelled images:

(a) every measured layer quantized alone, the rest FP32;
(b) every layer quantized (the plain post-training quantization proxy);
(c) for the ``top`` layers of (a) by KL: everything quantized except that layer, which is raised
    (``RAISED_PRECISION``: int8 -> float, 4-bit -> int8).

The ranking puts the layers of (c) first, by what raising them gains over (b): pixel agreement,
then KL reduction; then the others by their KL in (a). Under weight-only schemes the depthwise
layers keep int8 weights (``KEPT_UNDER_WEIGHT_ONLY``), and the layers the scheme's backend
stores float whatever their precision (``fake_quant.float_in_artifact``: Core ML's small and
ungroupable layers) stay float; neither is measured. Every case is scored
against the FP32 deploy form (``staged_evaluation.py``: KL, SQNR, agreement, mIoU and its
change), restarting from cached intermediate states so that a case runs only the steps after
its first changed layer. With a ``Bound``, ``selection.py`` picks the layers to raise.
"""
from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

import torch

from lrformer_edge.artifacts.metadata import checkpoint_record
from lrformer_edge.artifacts.precision_config import FLOAT, SCHEMES
from lrformer_edge.cpu import host_cpu
from lrformer_edge.data.calibration import (
    DEFAULT_CALIBRATION_IMAGES,
    PROCEDURAL,
    build_calibration_set,
)
from lrformer_edge.evaluation import load_samples
from lrformer_edge.models.deploy import to_deploy
from lrformer_edge.models.layers import Layer, layer_macs, quantizable_layers
from lrformer_edge.progress import heartbeat, track
from lrformer_edge.quant.fake_quant import (
    RAISED_PRECISION,
    FakeQuantizer,
    calibrate_ranges,
    float_in_artifact,
    measured_layers,
    scheme_precisions,
    simulated_storage,
)
from lrformer_edge.quant.selection import (
    Bound,
    Rankings,
    Selection,
    SizeModel,
    check_bound,
    select_smallest,
    select_within_size,
    within_compute_budget,
)
from lrformer_edge.quant.staged_evaluation import (
    Baseline,
    CaseScore,
    HeldOut,
    StagedEvaluator,
)

DEFAULT_SCHEMES = ("int8", "palette4")
# Held-out images of the sweep: four 512x512 scenes are a million pixels per case, and keep a
# full run of LRFormer-T within 15 minutes on 2 cores.
DEFAULT_IMAGES = 4
# Layers of (a) that get an all-but-one case (c) for the ranking, per scheme.
DEFAULT_TOP = 24


@dataclass
class LayerResult:
    layer: Layer
    alone: CaseScore  # (a)
    all_but: CaseScore | None = None  # (c), for the top layers of (a)

    def gain(self, everything: CaseScore) -> tuple[float, float] | None:
        """(agreement gain, KL reduction) of raising this layer alone over (b)."""
        if self.all_but is None:
            return None
        return (self.all_but.agreement - everything.agreement,
                everything.kl - self.all_but.kl)

    def sensitivity(self, everything: CaseScore) -> float:
        """One number per layer, larger is worse: the KL reduction of raising it (c) where
        measured, else its KL alone (a)."""
        gain = self.gain(everything)
        return gain[1] if gain is not None else self.alone.kl


@dataclass
class SchemeResult:
    scheme: str
    everything: CaseScore  # (b)
    layers: dict[str, LayerResult]  # measured layers, in model order
    kept: dict[str, str]  # layers at a fixed precision by rule, not measured
    ranking: list[str]
    seconds: float
    selection: Selection | None = None
    # Layers the scheme's backend stores float whatever their precision (not compressed in the
    # simulation, not measured), and that backend's artifact in words.
    stays_float: list[str] = field(default_factory=list)
    artifact: str | None = None


@dataclass
class SensitivityRun:
    variant: str
    checkpoint_sha256: str
    input_size: tuple[int, int]
    layers: tuple[Layer, ...]
    held_out: dict  # description, images, names
    calibration: dict
    fp32_miou: float
    schemes: dict[str, SchemeResult]
    settings: dict
    step_seconds: dict[str, float]
    timing: dict[str, float]
    steps_run: int
    size_models: dict[str, SizeModel]  # per scheme
    cpu: str = field(default_factory=lambda: host_cpu().describe())

    @property
    def rankings(self) -> Rankings:
        return Rankings(self.variant, self.checkpoint_sha256, tuple(self.input_size),
                        {s: tuple(r.ranking) for s, r in self.schemes.items()},
                        {s: dict(r.kept) for s, r in self.schemes.items()})


def check_schemes(schemes) -> tuple[str, ...]:
    schemes = tuple(dict.fromkeys(schemes))
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown or not schemes:
        raise ValueError(f"unknown scheme {unknown[0] if unknown else '(none)'}; expected one "
                         f"or more of {', '.join(SCHEMES)}")
    return schemes


def check_counts(images: int, calibration_images: int, top: int) -> None:
    for flag, value, least in (("--images", images, 1), ("--calib-images", calibration_images, 1),
                               ("--top", top, 0)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")


def check_compute_budget(max_float_gmacs: float | None, bound: Bound | None, schemes) -> None:
    """Refuse a float-compute budget that no selection would use, or a negative one."""
    if max_float_gmacs is None:
        return
    if not max_float_gmacs >= 0:
        raise ValueError(f"--max-float-gmacs must be 0 or more, got {max_float_gmacs}")
    if bound is None or not bound.applies_to("int8") or "int8" not in schemes:
        raise ValueError("--max-float-gmacs limits the int8 selection: give it with --max-drop "
                         "or --min-agreement and the int8 scheme")


def run_sensitivity(model, input_size, schemes=DEFAULT_SCHEMES, images: int = DEFAULT_IMAGES,
                    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
                    top: int = DEFAULT_TOP,
                    data: str | None = None, calibration_source: str = PROCEDURAL,
                    calibration_seed: int = 0, bound: Bound | None = None,
                    max_float_gmacs: float | None = None, log=print) -> SensitivityRun:
    """Measure every scheme on ``model`` (reference form) at ``input_size`` and, with a
    ``bound``, select the layers to raise for each scheme it applies to (``max_float_gmacs``:
    the compute the int8 selection may keep in float, see ``select``)."""
    check_compute_budget(max_float_gmacs, bound, schemes)
    began = time.perf_counter()
    schemes = check_schemes(schemes)
    check_counts(images, calibration_images, top)
    input_size = tuple(int(v) for v in input_size)
    deployed = to_deploy(model, input_size)
    layers = quantizable_layers(deployed)
    size_models = {scheme: SizeModel.of(deployed, layers, scheme) for scheme in schemes}
    macs = layer_macs(deployed, input_size)
    check_bound(bound, schemes, size_models)
    timing = {}

    samples, description = load_samples(data, images, input_size)
    held_out = HeldOut.from_samples(samples, model.config.data, input_size, description)
    clock = time.perf_counter()
    calibration = build_calibration_set(calibration_source, model.config.data, input_size,
                                        calibration_images, calibration_seed)
    batches = [torch.from_numpy(batch) for batch in calibration.batches]
    ranges = calibrate_ranges(deployed, track(batches, what="images",
                                              label="int8 activation ranges"))
    timing["calibration_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    quantizer = FakeQuantizer(deployed, ranges)
    evaluator = StagedEvaluator(deployed, quantizer, held_out, model.config.num_classes)
    timing["fp32_reference_s"] = time.perf_counter() - clock
    log(f"FP32 deploy form on {len(held_out.batches)} held-out images: mIoU "
        f"{100 * evaluator.fp32.score.miou:.2f}; {len(layers)} layers, "
        f"{len(evaluator.steps)} steps")

    results: dict[str, SchemeResult] = {}
    cases = sum(case_count(layers, scheme, top) for scheme in schemes)
    sweep = _sweep(evaluator, layers, schemes, top, bound, size_models, results, log,
                   macs, max_float_gmacs)
    for _ in track(sweep, cases, "cases", f"sensitivity of {', '.join(schemes)}"):
        pass

    timing["total_s"] = time.perf_counter() - began
    quantizer.close()
    return SensitivityRun(
        variant=model.config.name, checkpoint_sha256=checkpoint_record(model),
        input_size=input_size, layers=layers,
        held_out={"description": description, "images": len(held_out.batches),
                  "names": held_out.names},
        calibration={**calibration.describe(), "ranges": {n: r.as_dict()
                                                          for n, r in ranges.items()}},
        fp32_miou=evaluator.fp32.score.miou, schemes=results,
        settings={"schemes": list(schemes), "images": images,
                  "calibration_images": calibration_images, "top": top, "data": data,
                  "max_float_gmacs": max_float_gmacs, "layer_gmacs": {
                      name: count / 1e9 for name, count in macs.items()},
                  "bound": None if bound is None else {"criterion": bound.criterion,
                                                       "value": bound.value}},
        step_seconds=evaluator.step_seconds, timing=timing, steps_run=evaluator.steps_run,
        size_models=size_models)


def _sweep(evaluator, layers, schemes, top, bound, size_models, results, log, macs=None,
           max_float_gmacs=None) -> Iterator[str]:
    """Every scheme's cases and selection, yielding once per case (for the progress line) and
    filling ``results``."""
    for scheme in schemes:
        clock = time.perf_counter()
        result, everything = yield from scheme_cases(evaluator, layers, scheme, top)
        if bound is not None and bound.applies_to(scheme):
            with heartbeat(f"{scheme}: selecting for {bound.describe()}"):
                result.selection = select(evaluator, result, everything, bound,
                                          size_models[scheme], macs, max_float_gmacs)
        del everything  # its cached states: hundreds of MB at 512x512
        result.seconds = time.perf_counter() - clock
        results[scheme] = result
        log(describe_scheme(result))


def case_count(layers: tuple[Layer, ...], scheme: str, top: int) -> int:
    """The cases (a) and (c) of ``scheme``."""
    measured = len(measured_layers(layers, scheme))
    return measured + min(top, measured)


def measure_scheme(evaluator: StagedEvaluator, layers: tuple[Layer, ...], scheme: str,
                   top: int) -> tuple[SchemeResult, Baseline]:
    """Cases (a), (b) and (c) of ``scheme``, its ranking, and the baseline of (b) (what a
    selection restarts from)."""
    cases = scheme_cases(evaluator, layers, scheme, top)
    try:
        while True:
            next(cases)
    except StopIteration as finished:
        return finished.value


def scheme_cases(evaluator: StagedEvaluator, layers: tuple[Layer, ...], scheme: str,
                 top: int) -> Generator[str, None, tuple[SchemeResult, Baseline]]:
    """``measure_scheme`` yielding each case's layer name when it is done."""
    base = scheme_precisions(layers, scheme)
    measured = measured_layers(layers, scheme)
    kept = {name: precision for name, precision in base.items() if precision != scheme}
    scores = {}
    for layer in _mixed_costs(measured):
        scores[layer.name] = evaluator.score({layer.name: base[layer.name]}, scheme)
        yield layer.name
    alone = {layer.name: LayerResult(layer, scores[layer.name]) for layer in measured}
    everything = evaluator.baseline(base, scheme)
    candidates = sorted(alone.values(), key=lambda r: r.alone.kl, reverse=True)[:top]
    raised = RAISED_PRECISION[scheme]
    for result in candidates:
        result.all_but = evaluator.score({**base, result.layer.name: raised}, scheme, everything)
        yield result.layer.name
    storage = simulated_storage(scheme)
    result = SchemeResult(scheme, everything.score, alone, kept,
                          rank(alone, everything.score), 0.0,
                          stays_float=float_in_artifact(layers, scheme),
                          artifact=storage.title if storage else None)
    return result, everything


def _mixed_costs(layers: list[Layer]) -> list[Layer]:
    """The layers alternately from the start and the end of the model: a case restarts at its
    layer, so early layers cost a whole forward pass and late ones only the decoder; mixing
    them keeps the progress line's ETA close from the start."""
    ordered = []
    for front, back in zip(layers[:(len(layers) + 1) // 2], reversed(layers)):
        ordered.append(front)
        if back is not front:
            ordered.append(back)
    return ordered[:len(layers)]


def rank(layers: dict[str, LayerResult], everything: CaseScore) -> list[str]:
    """Layers with an all-but-one case first, by (agreement gain, KL reduction); the others
    after, by their KL alone. Ties keep model order."""
    compared = [r for r in layers.values() if r.all_but is not None]
    others = [r for r in layers.values() if r.all_but is None]
    compared.sort(key=lambda r: r.gain(everything), reverse=True)
    others.sort(key=lambda r: r.alone.kl, reverse=True)
    return [r.layer.name for r in compared + others]


def select(evaluator: StagedEvaluator, result: SchemeResult, baseline: Baseline, bound: Bound,
           size_model: SizeModel, macs: dict[str, int] | None = None,
           max_float_gmacs: float | None = None) -> Selection:
    """The selection of ``bound`` for ``result``'s scheme, measured from ``baseline`` (b).
    ``max_float_gmacs`` (int8, where raised layers run in float): only ranked layers that fit
    that many multiply-accumulates per image (``macs``: per layer) are raised."""
    selection = _select(evaluator, result, baseline, bound, size_model, macs, max_float_gmacs)
    if macs is not None and RAISED_PRECISION[result.scheme] == FLOAT:
        selection.float_gmacs = sum(macs[name] for name in selection.raised) / 1e9
        selection.float_gmacs_budget = max_float_gmacs
    return selection


def _select(evaluator, result, baseline, bound, size_model, macs, max_float_gmacs) -> Selection:
    base = baseline.assignment

    def scorer(assignment):
        return evaluator.score(assignment, result.scheme, baseline)

    if bound.criterion == "max-size-mib":
        sensitivity = {name: r.sensitivity(result.everything) for name, r in result.layers.items()}
        return select_within_size(scorer, result.scheme, base, sensitivity, bound, size_model)
    ranking = result.ranking
    if max_float_gmacs is not None and RAISED_PRECISION[result.scheme] == FLOAT:
        ranking = within_compute_budget(ranking, macs, max_float_gmacs)
    return select_smallest(scorer, result.scheme, base, ranking, result.everything,
                           bound, size_model)


def describe_scheme(result: SchemeResult) -> str:
    everything = result.everything
    line = (f"{result.scheme}: everything quantized: agreement {100 * everything.agreement:.3f}%, "
            f"mIoU {everything.miou_delta_points:+.2f} points, KL {everything.kl:.3g}; "
            f"{len(result.layers)} layers measured in {result.seconds:.1f} s; most sensitive: "
            f"{', '.join(result.ranking[:3])}")
    selection = result.selection
    if selection is not None:
        line += (f"; {selection.bound.describe()}: {selection.k} layer(s) raised to "
                 f"{selection.precision} -> agreement {100 * selection.score.agreement:.3f}%, "
                 f"mIoU {selection.score.miou_delta_points:+.2f} points, "
                 f"{selection.size_mib:.2f} MiB modelled"
                 + ("" if selection.met else " (bound NOT met)"))
    return line
