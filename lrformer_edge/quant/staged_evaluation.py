"""Scores of fake-quantized deploy forms against the FP32 deploy form, computed in stages.

A ``Baseline`` runs every held-out image through every step of ``deploy_steps`` under one
assignment {layer: precision} (the FP32 form: no assignment; the plain PTQ proxy: every layer
quantized) and keeps the state before each step. A case that differs from a baseline only in
some layers restarts each image from the baseline's state before the first step that calls one
of them, so quantizing one decoder layer costs the decoder's steps only. The result is exactly
what a run from the input gives (the skipped steps would compute the cached states again).

Scores compare the case's logits (after the final resize, at the input size) with the FP32
ones: KL(FP32 || case) per pixel (nats), SQNR (dB), argmax agreement, and mIoU against the
held-out labels with its change vs FP32 in points.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lrformer_edge.artifacts.precision_config import FLOAT
from lrformer_edge.data.datasets import IGNORE_INDEX, Sample
from lrformer_edge.metrics import ConfusionMatrix
from lrformer_edge.postprocess import labels_at_size
from lrformer_edge.preprocess import preprocess
from lrformer_edge.quant.deploy_steps import StepState, deploy_steps, first_step_of, run_steps
from lrformer_edge.quant.fake_quant import FakeQuantizer


@dataclass(frozen=True)
class CaseScore:
    kl: float  # mean over pixels of KL(FP32 || case), nats
    sqnr_db: float | None  # logits; None where the logits equal FP32's
    agreement: float  # fraction of pixels whose argmax equals FP32's
    miou: float  # against the held-out labels
    miou_delta_points: float  # vs the FP32 form's mIoU

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HeldOut:
    """Preprocessed held-out images and their labels at the input size."""

    batches: list[torch.Tensor]  # (1, 3, H, W) each
    labels: list[np.ndarray]  # (H, W) each, IGNORE_INDEX where unlabelled
    names: list[str]
    description: str

    @classmethod
    def from_samples(cls, samples: list[Sample], data_config, input_size,
                     description: str) -> HeldOut:
        size = tuple(input_size)
        batches = [torch.from_numpy(preprocess(s.image, data_config.mean, data_config.std,
                                               input_size=size).batch) for s in samples]
        labels = [labels_at_size(s.label, size) for s in samples]
        return cls(batches, labels, [s.name for s in samples], description)


@dataclass
class Baseline:
    """The states of every image before every step under ``assignment``, and its score."""

    assignment: dict[str, str]
    scheme: str | None
    states: list[list[StepState]]  # per image: before step 0, ..., after the last step
    score: CaseScore

    def logits(self, image: int) -> torch.Tensor:
        return self.states[image][-1].x


@dataclass
class _Reference:
    logits: list[torch.Tensor]
    probs: list[torch.Tensor]
    labels: list[torch.Tensor]
    power: float  # sum of squared logits over all images
    miou: float = math.nan


@dataclass
class StagedEvaluator:
    """Scores assignments of a deploy-form model on held-out images, reusing cached stages."""

    deployed: torch.nn.Module
    quantizer: FakeQuantizer
    held_out: HeldOut
    num_classes: int
    step_seconds: dict[str, float] = field(default_factory=dict)  # FP32, mean per image

    def __post_init__(self):
        self.steps = deploy_steps(self.deployed)
        self._first_step = {name: first_step_of(self.steps, name)
                            for name in self.quantizer.modules}
        self.steps_run = 0
        self.fp32 = self._fp32_baseline()

    # ------------------------------------------------------------------ public
    def baseline(self, assignment: Mapping[str, str], scheme: str) -> Baseline:
        """Run everything under ``assignment`` and keep every state."""
        assignment = dict(assignment)
        states = []
        with torch.inference_mode(), self.quantizer.applied(assignment, scheme):
            for batch in self.held_out.batches:
                kept: list[StepState] = []
                run_steps(self.steps, StepState(batch), keep=kept)
                self.steps_run += len(self.steps)
                states.append(kept)
        score = self._score([image[-1].x for image in states])
        return Baseline(assignment, scheme, states, score)

    def score(self, assignment: Mapping[str, str], scheme: str,
              baseline: Baseline | None = None) -> CaseScore:
        """The score of ``assignment`` (layers not named stay float), restarted from
        ``baseline`` (default: FP32) where they first differ."""
        baseline = _restartable(baseline or self.fp32, scheme)
        if self.first_difference(assignment, baseline.assignment) is None:
            return baseline.score
        return self._score(self.case_logits(assignment, scheme, baseline))

    def case_logits(self, assignment: Mapping[str, str], scheme: str,
                    baseline: Baseline | None = None) -> list[torch.Tensor]:
        """Each held-out image's logits under ``assignment``, restarted from ``baseline``."""
        baseline = _restartable(baseline or self.fp32, scheme)
        start = self.first_difference(assignment, baseline.assignment)
        if start is None:
            return [baseline.logits(image) for image in range(len(baseline.states))]
        logits = []
        with torch.inference_mode(), self.quantizer.applied(dict(assignment), scheme):
            for image in range(len(self.held_out.batches)):
                state = run_steps(self.steps, baseline.states[image][start], start)
                self.steps_run += len(self.steps) - start
                logits.append(state.x)
        return logits

    def first_difference(self, assignment: Mapping[str, str],
                         other: Mapping[str, str]) -> int | None:
        """The first step that calls a layer whose precision differs (None: none does)."""
        names = set(assignment) | set(other)
        differing = [self._first_step[name] for name in names
                     if assignment.get(name, FLOAT) != other.get(name, FLOAT)]
        return min(differing, default=None)

    def first_step(self, layer: str) -> int:
        return self._first_step[layer]

    # ------------------------------------------------------------------ scoring
    def _fp32_baseline(self) -> Baseline:
        states, seconds = [], {step.name: 0.0 for step in self.steps}
        with torch.inference_mode():
            for batch in self.held_out.batches:
                state, kept = StepState(batch), []
                for step in self.steps:
                    kept.append(state)
                    began = time.perf_counter()
                    state = step.run(state)
                    seconds[step.name] += time.perf_counter() - began
                kept.append(state)
                states.append(kept)
        images = len(self.held_out.batches)
        self.step_seconds = {name: total / images for name, total in seconds.items()}
        logits = [image[-1].x for image in states]
        self._reference = _Reference(
            logits=logits, probs=[F.softmax(x, dim=1) for x in logits],
            labels=[class_map(x) for x in logits],
            power=sum(float((x * x).sum(dtype=torch.float64)) for x in logits))
        self._reference.miou = self._miou(self._reference.labels)
        baseline = Baseline({}, None, states, CaseScore(0.0, None, 1.0, self._reference.miou, 0.0))
        return baseline

    def _miou(self, predictions: list[torch.Tensor]) -> float:
        matrix = ConfusionMatrix(self.num_classes, IGNORE_INDEX)
        for labels, prediction in zip(self.held_out.labels, predictions):
            matrix.update(labels, prediction[0].numpy())
        return matrix.compute()["mIoU"]

    def _score(self, logits: list[torch.Tensor]) -> CaseScore:
        reference = self._reference
        kl = noise = 0.0
        same = pixels = 0
        predictions = []
        for case, p, ref_logits, ref_labels in zip(logits, reference.probs, reference.logits,
                                                    reference.labels):
            difference = ref_logits - case
            kl += kl_divergence_sum(p, difference)
            noise += float((difference * difference).sum(dtype=torch.float64))
            prediction = class_map(case)
            same += int((prediction == ref_labels).sum())
            pixels += prediction.numel()
            predictions.append(prediction)
        miou = self._miou(predictions)
        sqnr = 10 * math.log10(reference.power / noise) if noise > 0 else None
        # rounding can leave a KL of -1e-17 where the outputs barely differ
        return CaseScore(max(0.0, kl / pixels), sqnr, same / pixels, miou,
                         100 * (miou - reference.miou))


def _restartable(baseline: Baseline, scheme: str) -> Baseline:
    """``baseline``, if a case of ``scheme`` may restart from it (FP32: any scheme)."""
    if baseline.scheme not in (None, scheme):
        raise ValueError(f"a {scheme} case cannot restart from a {baseline.scheme} baseline")
    return baseline


def kl_divergence_sum(p: torch.Tensor, difference: torch.Tensor) -> float:
    """Sum over pixels of KL(p || q), where ``p = softmax(x)``, ``q = softmax(x - difference)``
    over dim 1.

    Written as ``sum(p d) + log1p(sum(p expm1(-d)))`` (d: the logit difference): both terms are
    small where the distributions are close, so float32 keeps the KL of a layer that barely
    matters (1e-11 per pixel), which ``p * (log p - log q)`` in float32 loses in rounding, at
    half the cost of float64."""
    per_pixel = (p * difference).sum(1) + torch.log1p((p * torch.expm1(-difference)).sum(1))
    return float(per_pixel.sum(dtype=torch.float64))


def class_map(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel argmax over the classes; ``max(1).indices`` is three times faster than
    ``argmax(1)`` on (1, C, H, W) CPU tensors."""
    return logits.max(dim=1).indices
