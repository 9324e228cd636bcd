"""Post-training INT8 quantization with NNCF (OpenVINO backend).

Settings, and why:
* ``model_type=TRANSFORMER``: LayerNorm, Softmax and the attention's score/value products stay in
  float; MatMuls and convolutions get int8 inputs and weights.
* preset PERFORMANCE: symmetric int8 for weights and activations (what every int8 engine runs
  fastest, and the only form TensorRT accepts).
* SmoothQuant off for MatMuls (``smooth_quant_alphas.matmul = -1``): on AMX CPUs the Multiply
  nodes it inserts there failed to compile under the bf16 precision hint; every exported IR is
  compiled under f32, bf16 and f16 before it is written. On convolutions it is a choice
  (``smooth_quant``, off by default): a per-input-channel scale moved from the activations into
  the weights, so one per-tensor activation range fits inputs whose channels differ widely (the
  decoder's concatenated stages). It is model-dependent: on the bundled LRFormer-T at 512x512
  alpha 0.5 raised agreement with FP32 on 100 held-out scenes from 99.649 to 99.759% at the same
  latency, while on the tiny test variant's synthetic weights it lowered it (96 -> 85% on the
  parity images), so it is measured, not assumed (README, "Per-layer sensitivity").
* Ignored scope: the bilinear ``Interpolate`` nodes (``IGNORED_TYPES``: upsampling of attention
  outputs and the final logits) and the exact adaptive pooling products (MatMuls whose left
  operand is a constant averaging matrix, ``pooling_matmuls``): averaging gains nothing from
  int8, and the CPU plugin cannot compile an int8 MatMul whose weights are on the left (its
  check ``any_of(scale.size(), OC, 1U)`` fails: the per-row weight scale is not per output
  channel). The classifier is left to NNCF's defaults. Accuracy control, when asked for, reverts the most
  sensitive remaining layers to float until the mIoU drop fits.
* A precision config's float layers (``float_nodes``: their operations' friendly names,
  ``openvino/layer_names.py``) join the ignored scope; the scope is then validated, so a name
  NNCF does not find fails the export instead of leaving that layer quantized.
* ``target_isa`` (see ``lrformer_edge.cpu``): the default ``portable`` limits weights to 7 bits
  everywhere (``OverflowFix.ENABLE``), so no x86 CPU saturates its 16-bit int8 sums; ``vnni`` and
  ``amx`` keep full 8-bit weights (``OverflowFix.DISABLE``) for CPUs that accumulate in 32 bits.
  NNCF's own default (first layer only) suits neither and is never used.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lrformer_edge.artifacts.optional import require
from lrformer_edge.backends.nncf_statistics import SharedPass, cached_nncf_statistics
from lrformer_edge.backends.nncf_support import (
    FLOAT_POOLING,
    overflow_fix,
    target_isa_settings,
)
from lrformer_edge.cpu import DEFAULT_INT8_TARGET, resolve_int8_target
from lrformer_edge.metrics import ConfusionMatrix
from lrformer_edge.progress import heartbeat

IGNORED_TYPES = ("Interpolate",)
PRECISION_SCHEMES = ("int8",)  # of a precision config: INT8 with float layers (ignored scope)


def _nncf():
    import logging

    nncf = require("nncf", "openvino", "INT8 quantization")
    logging.getLogger("nncf").setLevel(logging.WARNING)  # one INFO line per float op otherwise
    return nncf


def check_smooth_quant(alpha: float | None) -> None:
    if alpha is not None and not 0 < alpha <= 1:
        raise ValueError(f"the SmoothQuant alpha of convolutions must be in (0, 1], got {alpha}")


def check_statistics_cache_request(smooth_quant: float | None, statistics_cache) -> None:
    """Refuse a statistics cache file named for a SmoothQuant export, which would not use it
    (``uses_statistics_cache``); the default (True) and False are fine."""
    if smooth_quant is not None and not isinstance(statistics_cache, bool) \
            and statistics_cache is not None:
        raise ValueError(f"statistics cache {statistics_cache} cannot serve a SmoothQuant "
                         f"export: SmoothQuant measures its per-channel maxima and ranges afresh "
                         f"each time; leave out the cache file (or SmoothQuant)")


def uses_statistics_cache(smooth_quant: float | None) -> bool:
    """SmoothQuant's per-channel maxima are not storable, and the ranges it leads to depend on
    which layers it scaled (a precision config's float layers are not), so its exports measure
    everything afresh."""
    return smooth_quant is None


def quantization_settings(calibration, max_drop, target_isa: str,
                          smooth_quant: float | None = None) -> dict:
    return {"quantization": {
        "tool": f"nncf {_nncf().__version__}", "model_type": "TRANSFORMER", "preset": "PERFORMANCE",
        "symmetric": True,
        "smooth_quant": False if smooth_quant is None else {"convolution": smooth_quant},
        "ignored_types": list(IGNORED_TYPES),
        "float_ops": FLOAT_POOLING,
        "accuracy_control_max_drop_miou_points": max_drop, **target_isa_settings(target_isa)},
        "calibration_set": calibration.describe()}


def ignored_scope(nncf, ov_model, float_nodes: Sequence[str] = ()):
    """Interpolates, pooling MatMuls and ``float_nodes``. Validated when ``float_nodes`` are
    given (the pooling names come from this model and every LRFormer has Interpolates, so only
    a wrong float node can fail it)."""
    return nncf.IgnoredScope(names=pooling_matmuls(ov_model) + list(float_nodes),
                             types=list(IGNORED_TYPES), validate=bool(float_nodes))


def pooling_matmuls(ov_model) -> list[str]:
    """Names of the MatMuls that multiply a constant matrix from the left: the deploy form's
    exact adaptive pooling (attention and linear layers have their weights on the right)."""
    return [op.get_friendly_name() for op in ov_model.get_ordered_ops()
            if op.get_type_name() == "MatMul"
            and op.input_value(0).get_node().get_type_name() == "Constant"]


def quantize_openvino(ov_model, torch_model, calibration, max_drop: float | None = None,
                      target_isa: str = DEFAULT_INT8_TARGET, statistics_cache=None,
                      float_nodes: Sequence[str] = (), smooth_quant: float | None = None,
                      fp32_onnx=None):
    """(quantized ov.Model, settings for the artifact metadata). ``statistics_cache``: a
    ``nncf_statistics.StatisticsCache`` whose statistics are reused where they cover the
    quantizer's (a new statistics pass is added to it). ``float_nodes``: friendly names of
    operations kept in float (a precision config's float layers); they are not part of the
    settings, so the statistics of a plain export cover an export with a config.
    ``smooth_quant``: SmoothQuant alpha of the convolutions (None: off; when on, no
    ``statistics_cache`` may be given: ``uses_statistics_cache``). ``fp32_onnx``: the path of
    the FP32 ONNX ``ov_model`` was converted from; its activations are measured by the pass
    every target shares (``activation_statistics``; not with SmoothQuant, which rescales
    them)."""
    target_isa = resolve_int8_target(target_isa)
    check_smooth_quant(smooth_quant)
    settings = quantization_settings(calibration, max_drop, target_isa, smooth_quant)
    if smooth_quant is not None and statistics_cache is not None:
        raise ValueError("SmoothQuant exports take no statistics cache (see uses_statistics_cache)")
    from lrformer_edge.backends.nncf_collectors import openvino_tensor_resolver

    shared = None if fp32_onnx is None or smooth_quant is not None else \
        SharedPass(fp32_onnx, calibration.batches, openvino_tensor_resolver)
    with heartbeat("NNCF INT8 quantization (OpenVINO)"), \
            cached_nncf_statistics(statistics_cache, settings["quantization"], shared):
        return _quantize(ov_model, torch_model, calibration, max_drop, target_isa,
                         float_nodes, smooth_quant), settings


def _quantize(ov_model, torch_model, calibration, max_drop, target_isa, float_nodes=(),
              smooth_quant=None):
    nncf = _nncf()
    dataset = nncf.Dataset(calibration.batches)
    common = dict(
        model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.PERFORMANCE,
        subset_size=len(calibration.batches),
        ignored_scope=ignored_scope(nncf, ov_model, float_nodes))
    advanced = nncf.AdvancedQuantizationParameters(
        overflow_fix=overflow_fix(nncf, target_isa),
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(
            matmul=-1, convolution=-1 if smooth_quant is None else smooth_quant))
    if max_drop is None:
        quantized = nncf.quantize(ov_model, dataset, advanced_parameters=advanced, **common)
    else:
        validation = list(zip(calibration.batches, _reference_labels(torch_model, calibration)))
        quantized = nncf.quantize_with_accuracy_control(
            ov_model, dataset, nncf.Dataset(validation), _miou_against_reference,
            max_drop=max_drop / 100.0, drop_type=nncf.DropType.ABSOLUTE,
            advanced_quantization_parameters=advanced, **common)
    return quantized


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
