"""Metrics against hand-computed confusion matrices."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lrformer_edge.metrics import ConfusionMatrix, compare_logits, label_agreement


def test_hand_computed_confusion_matrix_with_ignore_and_absent_class():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = np.array([[0, 1, 1, 1], [2, 0, 3, 0]])
    matrix = ConfusionMatrix(num_classes=4, ignore_index=255)
    matrix.update(target[:1], prediction[:1])  # streaming: two updates
    matrix.update(target[1:], prediction[1:])
    np.testing.assert_array_equal(matrix.matrix, [[1, 1, 0, 0],
                                                  [0, 2, 0, 0],
                                                  [1, 0, 1, 0],
                                                  [0, 0, 0, 0]])
    result = matrix.compute()
    # IoU: class0 1/(2+2-1)=1/3, class1 2/(2+3-2)=2/3, class2 1/(2+1-1)=1/2, class3 absent.
    np.testing.assert_allclose(result["IoU"][:3], [1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(result["IoU"][3])
    assert result["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert result["aAcc"] == pytest.approx(4 / 6)
    assert result["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert result["pixels"] == 6


def test_class_predicted_but_absent_from_target_counts_as_zero_iou():
    matrix = ConfusionMatrix(3)
    matrix.update(np.array([0, 0]), np.array([0, 2]))
    result = matrix.compute()
    assert result["IoU"][2] == 0.0 and math.isnan(result["IoU"][1])
    assert result["mIoU"] == pytest.approx((0.5 + 0.0) / 2)


def test_reset_merge_and_validation():
    a, b = ConfusionMatrix(2), ConfusionMatrix(2)
    a.update([0, 1], [0, 1])
    b.update([1], [0])
    a.merge(b)
    assert a.matrix.sum() == 3
    a.reset()
    assert a.matrix.sum() == 0
    with pytest.raises(ValueError, match="pixels"):
        a.update([0, 1], [0])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        a.update([0], [5])


def test_agreement_metrics():
    reference = np.zeros((1, 3, 2, 2), np.float32)
    reference[:, 0] = 1.0
    candidate = reference.copy()
    candidate[0, 1, 0, 0] = 2.0  # one pixel flips to class 1
    result = compare_logits(reference, candidate)
    assert result.pixel_agreement == pytest.approx(0.75)
    assert result.max_abs == pytest.approx(2.0)
    assert 0.5 < result.cosine < 1.0
    # reference labels all 0; candidate has one 1 -> IoU0 = 3/4, IoU1 = 0 -> mean 0.375
    assert result.miou_vs_reference == pytest.approx(0.375)
    assert label_agreement(np.ones((2, 2)), np.ones((2, 2)), 3)["pixel_agreement"] == 1.0
