"""NaN/Inf logits fail every parity check and the validation gate; NaN weights never export.

The bug report: an all-NaN checkpoint exported with "max-abs nan, cosine nan, argmax agreement
100.0000%" and exit code 0 (NaN compares false with every limit; all-NaN logits have the same
argmax everywhere).
"""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lrformer_edge.artifacts.parity import ParityError, ParityThresholds
from lrformer_edge.backends.onnxruntime.export import export_onnx
from lrformer_edge.metrics import compare_logits
from lrformer_edge.validation.gate import NONFINITE, check, load_thresholds
from lrformer_edge.validation.harness import BackendResult

REPO = Path(__file__).resolve().parents[1]


def _logits(seed=0):
    return np.random.default_rng(seed).normal(size=(1, 4, 8, 8)).astype(np.float32)


def test_all_nan_logits_on_both_sides_fail_parity():
    nan = np.full((1, 4, 8, 8), np.nan, np.float32)
    agreement = compare_logits(nan, nan)
    assert agreement.reference_nonfinite == agreement.candidate_nonfinite == nan.size
    assert agreement.pixel_agreement == 0.0  # not the 100% of the bug report
    assert agreement.max_abs == float("inf")
    problems = ParityThresholds().violations(agreement)
    assert problems[:2] == [f"reference logits have {nan.size} non-finite values (NaN/Inf)",
                            f"candidate logits have {nan.size} non-finite values (NaN/Inf)"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_candidate_value_fails_even_lenient_thresholds(bad):
    reference = _logits()
    candidate = reference.copy()
    candidate[0, 2, 3, 5] = bad
    agreement = compare_logits(reference, candidate)
    assert (agreement.reference_nonfinite, agreement.candidate_nonfinite) == (0, 1)
    assert agreement.pixel_agreement == pytest.approx(63 / 64)  # that pixel is a disagreement
    lenient = ParityThresholds(max_abs=float("inf"), min_cosine=-1.0, min_pixel_agreement=0.0)
    assert lenient.violations(agreement) == ["candidate logits have 1 non-finite values (NaN/Inf)"]
    assert ParityThresholds().violations(compare_logits(reference, reference.copy())) == []


def test_export_of_a_nan_model_is_refused_and_writes_nothing(tiny_model, tmp_path):
    """Past the checkpoint loader (weights set in memory): the parity check itself refuses."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(ParityError, match="reference logits have .* non-finite values"):
        export_onnx(model, tmp_path / "nan.onnx", (64, 64))
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_nan_checkpoint_naming_the_tensor(tiny_model, tmp_path):
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in tiny_model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "nan.pth")
    result = subprocess.run(
        [sys.executable, str(REPO / "export_scripts/to_onnx.py"), "--variant", "lrformer-test",
         "--input-size", "64", "64", "--checkpoint", "nan.pth", "--output", "nan.onnx"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: checkpoint nan.pth: tensor 'backbone.")
    assert "non-finite values (NaN/Inf)" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pth"]


def _result(nonfinite: int, ground_truth: bool = False) -> BackendResult:
    return BackendResult("onnxruntime fp32 (m.onnx)", "m.onnx", "onnxruntime", "fp32",
                         pixel_agreement=1.0, miou_delta_points=0.0,
                         worst_class_drop={"class": "sky", "drop_points": 0.0},
                         logits_max_abs=0.0, logits_cosine=1.0, ground_truth=ground_truth,
                         nonfinite_logits=nonfinite)


def test_gate_fails_a_result_with_non_finite_logits_whatever_its_metrics():
    thresholds = load_thresholds()
    assert check([_result(0)], thresholds) == []
    violations = check([_result(12)], thresholds)
    assert [v.metric for v in violations] == [NONFINITE]
    assert str(violations[0]) == ("onnxruntime fp32 (m.onnx): non-finite logits: 12 NaN/Inf "
                                  "values in its logits")
    ground_truth = check([_result(5, ground_truth=True)], thresholds)  # a NaN reference too
    assert [v.metric for v in ground_truth] == [NONFINITE]


def test_harness_counts_non_finite_logits_of_an_artifact(tiny_model, tmp_path):
    from lrformer_edge.evaluation import procedural_validation_samples
    from lrformer_edge.validation.harness import reference_result, run_artifact
    from lrformer_edge.validation.reference import compute_reference

    size = (64, 64)
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.decode_head.conv_seg.bias.fill_(float("nan"))
    path = export_onnx(model, tmp_path / "nan.onnx", size, parity=None).path
    samples = list(procedural_validation_samples(2, size))
    reference = compute_reference(tiny_model, samples, size, logit_images=2)
    names = tiny_model.config.data.class_names
    ground_truth, metrics = reference_result(reference, samples, names)
    assert ground_truth.nonfinite_logits == 0
    result, _ = run_artifact(path, samples, reference, metrics, names)
    assert result.status == "ok", result.reason
    assert result.nonfinite_logits > 0
    assert NONFINITE in {v.metric for v in check([ground_truth, result], load_thresholds())}


def test_a_nan_metric_passes_no_limit():
    """A cosine of NaN (all-zero logits) compares false with every limit: it must fail."""
    result = _result(0)
    result.logits_cosine = float("nan")
    violations = check([result], load_thresholds())
    assert [v.metric for v in violations] == ["min_logits_cosine"]
