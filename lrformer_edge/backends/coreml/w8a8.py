"""W8A8 in PyTorch for Core ML: int8 per-channel weights and int8 per-tensor activations at the
input of every convolution and linear layer, written as torch's ``quantized_decomposed`` Q/DQ ops.

The result is both the numerical proxy for the Core ML W8A8 package (it runs here, Core ML
predicts only on macOS) and what ``torch.export`` hands to coremltools, whose torch.export
frontend turns the Q/DQ pairs into MIL ``quantize``/``dequantize`` (iOS17+) and the int8 weights
into constexpr weights.

Why not ``coremltools.optimize.torch``: under torch 2.13 its FX-based ``LinearQuantizer`` cannot
symbolically trace LRFormer (its shape checks see an ``fx.Proxy``), and its PT2E
``CoreMLQuantizer`` imports ``torch.ao.quantization.quantizer``, which torch 2.13 removed. The ops
below are the ones PT2E quantization produces: symmetric int8, zero-point 0, weights per output
channel, activations per tensor (Softmax, LayerNorm and attention matmuls stay float16).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Registers torch.ops.quantized_decomposed.* (the PT2E Q/DQ ops) with the dispatcher.
import torch.ao.quantization.fx._decomposed  # noqa: F401  isort: skip
from lrformer_edge.progress import track

INT8_MIN, INT8_MAX = -128, 127
PERCENTILE_SAMPLE = 1 << 18
WEIGHT_MAX = 127  # symmetric weights use -127..127 so that negation is exact


@dataclass(frozen=True)
class W8A8Settings:
    activation_percentile: float = 99.99  # of |x| per calibration image, then averaged

    def as_dict(self) -> dict:
        return {"scheme": "W8A8 symmetric int8, zero-point 0",
                "weights": "per output channel, max-abs", "activations": "per tensor",
                "activation_range": f"mean over images of the {self.activation_percentile} "
                                    f"percentile of |x|"}


class QuantizedInputLayer(nn.Module):
    """A Conv2d or Linear whose input is fake-quantized per tensor and whose weight is int8."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, activation_scale: float):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"expected nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        # A folded MLP kernel (to_deploy) computes with its identity tap added.
        folded = getattr(layer, "folded_weight", None)
        weight = (folded() if folded else layer.weight).detach().float()
        amax = weight.abs().flatten(1).amax(1).clamp_min(1e-12)
        scale = amax / WEIGHT_MAX
        shape = (-1,) + (1,) * (weight.dim() - 1)
        quantized = torch.round(weight / scale.view(shape)).clamp(-WEIGHT_MAX, WEIGHT_MAX)
        self.register_buffer("weight_int8", quantized.to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", torch.zeros_like(scale, dtype=torch.int64))
        self.bias = layer.bias
        self.activation_scale = float(activation_scale)
        self.conv = None
        if isinstance(layer, nn.Conv2d):
            self.conv = {"stride": layer.stride, "padding": layer.padding,
                         "dilation": layer.dilation, "groups": layer.groups}

    def dequantized_weight(self) -> torch.Tensor:
        return torch.ops.quantized_decomposed.dequantize_per_channel(
            self.weight_int8, self.weight_scale, self.weight_zero_point, 0, INT8_MIN, INT8_MAX,
            torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        q = ops.quantize_per_tensor(x, self.activation_scale, 0, INT8_MIN, INT8_MAX, torch.int8)
        x = ops.dequantize_per_tensor(q, self.activation_scale, 0, INT8_MIN, INT8_MAX, torch.int8)
        weight = self.dequantized_weight()
        if self.conv is None:
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, **self.conv)


def quantizable_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))]


def _input_ranges(model: nn.Module, names: list[str], batches, percentile: float) -> dict:
    sums = dict.fromkeys(names, 0.0)
    modules = dict(model.named_modules())

    def observe(name):
        def hook(_module, inputs):
            flat = inputs[0].detach().abs().flatten().float()
            # A regular subsample keeps the percentile cheap on 100M-element activations.
            flat = flat[::max(1, flat.numel() // PERCENTILE_SAMPLE)]
            k = max(1, min(flat.numel(), round(flat.numel() * percentile / 100)))
            sums[name] += float(flat.kthvalue(k).values)
        return hook

    handles = [modules[name].register_forward_pre_hook(observe(name)) for name in names]
    try:
        with torch.no_grad():
            for batch in track(batches, what="images", label="W8A8 activation ranges"):
                model(torch.as_tensor(batch))
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / len(batches) for name, total in sums.items()}


def quantize_w8a8(deployed: nn.Module, calibration,
                  settings: W8A8Settings = W8A8Settings()) -> nn.Module:
    """A copy of the deploy-form ``deployed`` with every Conv2d/Linear made W8A8, activation ranges
    calibrated on ``calibration`` (a ``CalibrationSet`` at the deploy input size)."""
    if not calibration.batches:
        raise ValueError("W8A8 needs at least one calibration image")
    model = copy.deepcopy(deployed).eval()
    names = quantizable_layers(model)
    ranges = _input_ranges(model, names, calibration.batches, settings.activation_percentile)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        scale = max(ranges[name], 1e-8) / INT8_MAX
        setattr(parent, child, QuantizedInputLayer(layer, scale))
    model.config = getattr(deployed, "config", None)
    model.checkpoint_sha256 = getattr(deployed, "checkpoint_sha256", None)
    model.w8a8_layers = len(names)
    return model
