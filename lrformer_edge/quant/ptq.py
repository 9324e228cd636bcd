"""Post-training INT8 quantization with NNCF (OpenVINO backend).

Settings, and why:
* ``model_type=TRANSFORMER``: LayerNorm, Softmax and the attention's score/value products stay in
  float; MatMuls and convolutions get int8 inputs and weights.
* preset PERFORMANCE: symmetric int8 for weights and activations (what every int8 engine runs
  fastest, and the only form TensorRT accepts).
* SmoothQuant disabled (``smooth_quant_alphas.matmul = -1``): on AMX CPUs the Multiply nodes it
  inserts can fail to compile under the bf16 precision hint; every exported IR is compiled under
  f32, bf16 and f16 before it is written.
* Ignored scope (``IGNORED_TYPES``): the bilinear ``Interpolate`` nodes (upsampling of attention
  outputs and the final logits) are never fed quantized tensors by NNCF in any case; the
  classifier is left to NNCF's defaults. Accuracy control, when asked for, reverts the most
  sensitive remaining layers to float until the mIoU drop fits.
"""
from __future__ import annotations

import numpy as np

from lrformer_edge.metrics import ConfusionMatrix
from lrformer_edge.runners.base import require

IGNORED_TYPES = ("Interpolate",)


def _nncf():
    return require("nncf", "openvino", "INT8 quantization")


def quantization_settings(calibration, max_drop) -> dict:
    return {"quantization": {
        "tool": f"nncf {_nncf().__version__}", "model_type": "TRANSFORMER", "preset": "PERFORMANCE",
        "symmetric": True, "smooth_quant": False, "ignored_types": list(IGNORED_TYPES),
        "accuracy_control_max_drop_miou_points": max_drop},
        "calibration_set": calibration.describe()}


def quantize_openvino(ov_model, torch_model, calibration, max_drop: float | None = None):
    """(quantized ov.Model, settings for the artifact metadata)."""
    nncf = _nncf()
    dataset = nncf.Dataset(calibration.batches)
    common = dict(
        model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.PERFORMANCE,
        subset_size=len(calibration.batches),
        ignored_scope=nncf.IgnoredScope(types=list(IGNORED_TYPES), validate=False))
    advanced = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1, convolution=-1))
    if max_drop is None:
        quantized = nncf.quantize(ov_model, dataset, advanced_parameters=advanced, **common)
    else:
        validation = list(zip(calibration.batches, _reference_labels(torch_model, calibration)))
        quantized = nncf.quantize_with_accuracy_control(
            ov_model, dataset, nncf.Dataset(validation), _miou_against_reference,
            max_drop=max_drop / 100.0, drop_type=nncf.DropType.ABSOLUTE,
            advanced_quantization_parameters=advanced, **common)
    return quantized, quantization_settings(calibration, max_drop)


def _reference_labels(torch_model, calibration) -> list[np.ndarray]:
    import torch

    from lrformer_edge.models.deploy import to_deploy

    deployed = to_deploy(torch_model, calibration.batches[0].shape[2:])
    with torch.no_grad():
        return [deployed(torch.from_numpy(batch)).argmax(1).numpy() for batch in calibration.batches]


def _miou_against_reference(compiled_model, validation) -> float:
    """mIoU of the candidate's labels taking the FP32 model's labels as ground truth."""
    matrix = None
    for batch, reference in validation:
        logits = np.asarray(compiled_model(batch)[0])
        if matrix is None:
            matrix = ConfusionMatrix(logits.shape[1], ignore_index=-1)
        matrix.update(reference, logits.argmax(1))
    return matrix.compute()["mIoU"]
