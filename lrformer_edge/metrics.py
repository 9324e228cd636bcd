"""Accuracy metrics: a streaming confusion matrix, and agreement between two predictions.

The agreement functions are the parity checks every exporter and the validation harness use to
compare an artifact with the full-precision PyTorch model (the ground truth).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


class ConfusionMatrix:
    """Streaming confusion matrix (rows: ground truth, columns: prediction).

    ``update`` accepts label arrays of any shape; pixels whose target is ``ignore_index`` (or
    outside ``[0, num_classes)``) are skipped. ``compute`` returns the usual segmentation metrics;
    classes absent from both target and prediction get NaN IoU and are left out of the mean.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.matrix[:] = 0

    def update(self, target, prediction) -> None:
        target = np.asarray(target).astype(np.int64).ravel()
        prediction = np.asarray(prediction).astype(np.int64).ravel()
        if target.shape != prediction.shape:
            raise ValueError(f"target has {target.size} pixels, prediction {prediction.size}")
        keep = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        prediction = prediction[keep]
        if prediction.size and (prediction.min() < 0 or prediction.max() >= self.num_classes):
            raise ValueError(f"predictions must lie in [0, {self.num_classes}), "
                             f"got values in [{prediction.min()}, {prediction.max()}]")
        index = target[keep] * self.num_classes + prediction
        self.matrix += np.bincount(index, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

    def compute(self) -> dict:
        matrix = self.matrix.astype(np.float64)
        true_positive = np.diag(matrix)
        target_total = matrix.sum(axis=1)
        predicted_total = matrix.sum(axis=0)
        union = target_total + predicted_total - true_positive
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, true_positive / union, np.nan)
            class_accuracy = np.where(target_total > 0, true_positive / target_total, np.nan)
        total = matrix.sum()
        return {
            "mIoU": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
            "IoU": iou.tolist(),
            "aAcc": float(true_positive.sum() / total) if total else float("nan"),
            "mAcc": float(np.nanmean(class_accuracy)) if np.any(target_total > 0) else float("nan"),
            "Acc": class_accuracy.tolist(),
            "pixels": int(total),
        }


@dataclass
class Agreement:
    """How closely a candidate's output follows the reference's."""

    pixel_agreement: float  # fraction of pixels with the same argmax
    miou_vs_reference: float  # mIoU of the candidate's labels, taking the reference's as truth
    max_abs: float | None = None  # logits
    mean_abs: float | None = None
    cosine: float | None = None
    reference_nonfinite: int = 0  # NaN/Inf values among the logits
    candidate_nonfinite: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def nonfinite_problems(self) -> list[str]:
        """NaN/Inf logits on either side: no parity check may pass then (NaN compares false
        with every limit, and an all-NaN output has the same argmax everywhere)."""
        return [f"{side} logits have {count} non-finite values (NaN/Inf)"
                for side, count in (("reference", self.reference_nonfinite),
                                    ("candidate", self.candidate_nonfinite)) if count]


def count_nonfinite(array) -> int:
    """NaN and Inf values in ``array`` (logits of a broken model or artifact)."""
    return int((~np.isfinite(np.asarray(array))).sum())


def logits_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max-abs / mean-abs error and cosine similarity of two logits tensors of equal shape."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"logits shapes differ: reference {reference.shape}, "
                         f"candidate {candidate.shape}")
    nonfinite = {"reference_nonfinite": count_nonfinite(reference),
                 "candidate_nonfinite": count_nonfinite(candidate)}
    if any(nonfinite.values()):  # an infinite error, never a NaN that passes every comparison
        return {"max_abs": float("inf"), "mean_abs": float("inf"), "cosine": float("nan"),
                **nonfinite}
    diff = np.abs(reference - candidate)
    norm = np.linalg.norm(reference) * np.linalg.norm(candidate)
    cosine = float((reference * candidate).sum() / norm) if norm > 0 else float("nan")
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "cosine": cosine,
            **nonfinite}


def label_agreement(reference_labels: np.ndarray, candidate_labels: np.ndarray,
                    num_classes: int) -> dict:
    reference_labels = np.asarray(reference_labels)
    candidate_labels = np.asarray(candidate_labels)
    if reference_labels.shape != candidate_labels.shape:
        raise ValueError(f"label maps differ in shape: {reference_labels.shape} vs "
                         f"{candidate_labels.shape}")
    matrix = ConfusionMatrix(num_classes, ignore_index=-1)
    matrix.update(reference_labels, candidate_labels)
    return {"pixel_agreement": float((reference_labels == candidate_labels).mean()),
            "miou_vs_reference": matrix.compute()["mIoU"]}


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> Agreement:
    """Full parity check of two (B, C, H, W) logits tensors; a pixel with a NaN/Inf logit on
    either side counts as a disagreement."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    logits = logits_agreement(reference, candidate)
    reference_labels, candidate_labels = reference.argmax(1), candidate.argmax(1)
    labels = label_agreement(reference_labels, candidate_labels, reference.shape[1])
    if logits["reference_nonfinite"] or logits["candidate_nonfinite"]:
        finite = np.isfinite(reference).all(1) & np.isfinite(candidate).all(1)
        labels["pixel_agreement"] = float(((reference_labels == candidate_labels) & finite).mean())
    return Agreement(**labels, **logits)


def decisive_argmax_agreement(reference: np.ndarray, candidate: np.ndarray,
                              margin: float) -> tuple[float, float]:
    """Argmax agreement on pixels whose reference top-2 logit margin exceeds ``margin``.

    Where two classes are tied to within float noise, any correct implementation may pick
    either; the official reference tolerances use the same rule. Returns
    (agreement on decisive pixels, fraction of pixels that are decisive).
    """
    reference = np.asarray(reference)
    top2 = np.sort(reference, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > margin
    same = reference.argmax(1) == np.asarray(candidate).argmax(1)
    if not decisive.any():
        return float("nan"), 0.0
    return float(same[decisive].mean()), float(decisive.mean())
