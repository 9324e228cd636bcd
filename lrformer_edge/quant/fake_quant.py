"""Fake quantization of the deploy form, layer by layer, for the sensitivity analysis.

What a precision means for one layer (``models/layers.py``), simulated in PyTorch:

* ``int8`` under the ``int8`` scheme (the W8A8 backends: OpenVINO, TensorRT, ExecuTorch,
  LiteRT): weights symmetric per output channel, 8-bit (scale ``max|w| / 127``), and the
  layer's input activation per tensor, 8-bit, over the range seen on calibration images
  (unsigned ``[0, max]`` when the observed minimum is >= 0, else symmetric);
* ``int8`` under a weight-only scheme (Core ML): the same weights, float activations;
* ``weights-int4``: weights symmetric per output channel, 4-bit;
* ``palette4``: one 16-entry look-up table per group of ``PALETTE_GROUP_SIZE`` output channels,
  found by 1-D k-means over the group's weights (Core ML's iOS18 palettes:
  ``OpPalettizerConfig(nbits=4, mode="kmeans", granularity="per_grouped_channel")``);
* ``float``: untouched.

The weight-only schemes are simulated as the backend that applies them stores them
(``weight_storage``: ``Backend.keeps_float``): a layer it leaves float at its precision (Core
ML: at most 2048 weights, or a palette whose output channels do not divide into groups) stays
float here too, and is neither measured nor selected. The ``int8`` scheme follows the W8A8
backends, which quantize every layer.

Weights are quantized in the form a backend stores them (``stored_weight``), scheme by scheme:

* a per-output-channel factor the exporters fold into a kernel (``channel_factors``): the
  BatchNorm after a convolution (the stem, the decoder's squeezes) and the layer scale that
  multiplies an MLP's output, i.e. its ``fc2`` (backbone stages 3-4, the decoder). Folded under
  every scheme. ``palette4`` needs it: a look-up table shared by 16 channels of different scales
  is not the table of the unscaled kernel, and Core ML palettises the folded kernel. ``int8``
  and ``weights-int4`` are unchanged by it up to rounding (one symmetric scale per output
  channel absorbs the factor), so the int8 weights match OpenVINO (which fuses the layer-scale
  Multiply into ``fc2`` before quantizing it) and TensorRT (which quantizes ``fc2`` and keeps
  the Multiply) alike.
* a ``ResidualDepthwiseConv2d``'s identity: folded into the kernel under ``int8`` (the ONNX
  exporters store ``to_deploy``'s folded kernel as one constant), not under the weight-only
  schemes (Core ML converts with ``fold_mlp_residuals=False`` and stores the kernel alone).

A ``FakeQuantizer`` swaps precomputed fake-quantized weights into the model and quantizes inputs
in forward pre-hooks, for any assignment {layer: precision}, and restores the model afterwards.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lrformer_edge.artifacts.precision_config import FLOAT, PRECISION_ORDER, WEIGHT_ONLY_SCHEMES
from lrformer_edge.backends import BACKENDS
from lrformer_edge.backends.base import Backend
from lrformer_edge.models.deploy import ResidualDepthwiseConv2d
from lrformer_edge.models.layers import Layer, quantizable_layers
from lrformer_edge.models.lrformer import ConvBNReLU

PALETTE_ENTRIES = 16
# Output channels that share one look-up table: Core ML's iOS18 grouped palettes
# (``PALETTE_GROUP_SIZE`` of ``backends/coreml/compression.py``, which this layer may not import;
# tests/test_sensitivity.py keeps the two equal).
PALETTE_GROUP_SIZE = 16
KMEANS_ITERATIONS = 20
# Under the weight-only schemes, layers of these kinds keep int8 weights instead of 4 bits: a
# depthwise kernel is a few hundred weights (0.19 of LRFormer-T's 13.1 M), so 4 bits save
# nothing worth their error. They are neither measured nor selected, and every emitted config
# names them in its overrides.
KEPT_UNDER_WEIGHT_ONLY = {"depthwise": "int8"}
# What "raising" a layer of each scheme means for the ranking's all-but-one cases and for the
# selection: the next precision a backend of that scheme applies per layer.
RAISED_PRECISION = {"int8": FLOAT, "weights-int4": "int8", "palette4": "int8"}


# ----------------------------------------------------------------------------- weights
def int_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel (dim 0) fake quantization to ``bits`` bits."""
    levels = 2 ** (bits - 1) - 1
    scale = channel_scales(weight, bits)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    scale = scale.view(shape)
    return torch.clamp(torch.round(weight / scale), -levels, levels) * scale


def channel_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The per-output-channel scales of ``int_weight`` (an all-zero channel gets 1)."""
    largest = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
    scale = largest / (2 ** (bits - 1) - 1)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def palette_weight(weight: torch.Tensor, entries: int = PALETTE_ENTRIES,
                   group_size: int = PALETTE_GROUP_SIZE,
                   iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Every value replaced by the nearest of ``entries`` k-means centres of its group of
    ``group_size`` output channels (dim 0; channels ``[g * group_size, (g + 1) * group_size)``
    share group ``g``'s table)."""
    channels = weight.shape[0]
    if channels % group_size:
        raise ValueError(f"{channels} output channels do not divide into palette groups of "
                         f"{group_size}; such a layer stays float")
    groups = weight.detach().double().reshape(channels // group_size, -1)
    centres = kmeans_1d(groups, entries, iterations)
    boundaries = ((centres[:, 1:] + centres[:, :-1]) / 2).contiguous()
    index = torch.searchsorted(boundaries, groups)
    return centres.gather(1, index).reshape(weight.shape).to(weight.dtype)


def kmeans_1d(values: torch.Tensor, entries: int, iterations: int) -> torch.Tensor:
    """Sorted centres (groups, entries) of a deterministic 1-D k-means (Lloyd from quantile
    centres) of each row of ``values`` (groups, n), all rows at once.

    On sorted values each cluster is a contiguous run, so an iteration is a search for the
    midpoints and cluster means from a cumulative sum: O(entries log n), after one sort."""
    ordered = values.double().sort(dim=1).values
    groups, count = ordered.shape
    quantiles = (torch.arange(entries, dtype=torch.float64) + 0.5) / entries
    centres = torch.quantile(ordered, quantiles, dim=1).T.contiguous()
    cumulative = torch.cat([ordered.new_zeros(groups, 1), ordered.cumsum(1)], dim=1)
    for _ in range(iterations):
        cuts = torch.searchsorted(ordered, ((centres[:, 1:] + centres[:, :-1]) / 2).contiguous())
        edges = torch.cat([cuts.new_zeros(groups, 1), cuts, cuts.new_full((groups, 1), count)],
                          dim=1)
        sizes = edges[:, 1:] - edges[:, :-1]
        sums = cumulative.gather(1, edges[:, 1:]) - cumulative.gather(1, edges[:, :-1])
        # an empty cluster keeps its centre; sorting keeps the midpoints between neighbours
        updated = torch.where(sizes > 0, sums / sizes.clamp(min=1), centres).sort(dim=1).values
        if torch.equal(updated, centres):
            break
        centres = updated
    return centres


WEIGHT_FORMATS = {
    "int8": lambda weight: int_weight(weight, 8),
    "weights-int4": lambda weight: int_weight(weight, 4),
    "palette4": palette_weight,
}


# ----------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActivationRange:
    """The range of a layer's input seen on the calibration images."""

    low: float
    high: float

    @property
    def unsigned(self) -> bool:
        return self.low >= 0

    @property
    def scale(self) -> float:
        if self.unsigned:
            scale = self.high / 255
        else:
            scale = max(-self.low, self.high) / 127
        return scale if scale > 0 else 1.0

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        low, high = (0, 255) if self.unsigned else (-128, 127)
        return torch.clamp(torch.round(x / self.scale), low, high) * self.scale

    def as_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "unsigned": self.unsigned}


def calibrate_ranges(deployed: nn.Module,
                     batches: Iterable[torch.Tensor]) -> dict[str, ActivationRange]:
    """Each layer's input range over ``batches`` (FP32 forward passes; a layer called several
    times per pass, such as the shared ``d_convsN.i``, gets the range of all its calls)."""
    modules = layer_modules(deployed)
    low = {name: float("inf") for name in modules}
    high = {name: float("-inf") for name in modules}

    def observe(name):
        def hook(_module, inputs):
            smallest, largest = torch.aminmax(inputs[0])
            low[name] = min(low[name], float(smallest))
            high[name] = max(high[name], float(largest))
        return hook

    handles = [module.register_forward_pre_hook(observe(name))
               for name, module in modules.items()]
    try:
        with torch.inference_mode():
            for batch in batches:
                deployed(batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if low[name] == float("inf")]
    if missing:
        raise RuntimeError(f"calibration never reached {len(missing)} layer(s), e.g. {missing[0]}")
    return {name: ActivationRange(low[name], high[name]) for name in modules}


# ----------------------------------------------------------------------------- schemes
def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Layer name -> module, for every layer of ``quantizable_layers``."""
    names = {layer.name for layer in quantizable_layers(model)}
    return {name: module for name, module in model.named_modules() if name in names}


def scheme_precisions(layers: Iterable[Layer], scheme: str) -> dict[str, str]:
    """Every layer's precision when ``scheme`` quantizes the whole model (the plain PTQ)."""
    kept = KEPT_UNDER_WEIGHT_ONLY if scheme in WEIGHT_ONLY_SCHEMES else {}
    return {layer.name: kept.get(layer.kind, scheme) for layer in layers}


def weight_storage(scheme: str) -> Backend | None:
    """The backend that applies ``scheme`` and declares how its artifact stores layer weights
    (``Backend.weight_bytes``, ``keeps_float``), if any: the size model sizes artifacts by it."""
    return next((backend for backend in BACKENDS if scheme in backend.precision_schemes
                 and backend.weight_bytes is not None and backend.keeps_float is not None),
                None)


def simulated_storage(scheme: str) -> Backend | None:
    """The backend whose weight storage the simulation of ``scheme`` follows: the weight-only
    schemes are those of a backend that stores weights its own way; ``int8`` is simulated as
    the W8A8 backends quantize (every layer), whatever a weight-only backend does with it."""
    return weight_storage(scheme) if scheme in WEIGHT_ONLY_SCHEMES else None


def stays_float(layer: Layer, precision: str, scheme: str) -> bool:
    """Whether ``layer`` at ``precision`` keeps its float weights in the simulation of
    ``scheme`` (``float`` itself, or a layer the scheme's backend leaves uncompressed)."""
    if precision == FLOAT:
        return True
    storage = simulated_storage(scheme)
    return storage is not None and storage.keeps_float(layer, precision)


def float_in_artifact(layers: Iterable[Layer], scheme: str) -> list[str]:
    """The layers that the backend of ``scheme`` stores float at their scheme precision: not
    compressed in the simulation, not measured."""
    base = scheme_precisions(layers, scheme)
    return [layer.name for layer in layers
            if base[layer.name] != FLOAT and stays_float(layer, base[layer.name], scheme)]


def measured_layers(layers: Iterable[Layer], scheme: str) -> list[Layer]:
    """The layers whose sensitivity is measured and selected under ``scheme``: neither kept at a
    precision by rule (``KEPT_UNDER_WEIGHT_ONLY``) nor stored float by the scheme's backend."""
    layers = tuple(layers)
    kept = KEPT_UNDER_WEIGHT_ONLY if scheme in WEIGHT_ONLY_SCHEMES else {}
    left_float = set(float_in_artifact(layers, scheme))
    return [layer for layer in layers
            if layer.kind not in kept and layer.name not in left_float]


def quantizes_inputs(scheme: str, precision: str) -> bool:
    """Whether a layer at ``precision`` under ``scheme`` has int8 input activations."""
    return precision == "int8" and scheme not in WEIGHT_ONLY_SCHEMES


def folds_residual_identity(scheme: str) -> bool:
    """Whether the backends of ``scheme`` store a ``ResidualDepthwiseConv2d``'s kernel with its
    identity folded in (the ONNX exporters' W8A8 graphs do; Core ML stores the kernel alone)."""
    return scheme not in WEIGHT_ONLY_SCHEMES


def check_precision(precision: str) -> None:
    if precision not in PRECISION_ORDER:
        raise ValueError(f"precision must be one of {tuple(PRECISION_ORDER)}, got {precision!r}")


# ----------------------------------------------------------------------------- stored form
def folded_batchnorms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Convolution name -> the BatchNorm that follows it, which exporters fold into its kernel.

    In ``nn.Sequential`` and ``ConvBNReLU`` the order of the children is the order they run in,
    and these are the only places where a BatchNorm follows a convolution."""
    found = {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, (nn.Sequential, ConvBNReLU)):
            continue
        children = list(parent.named_children())
        for (name, child), (_, following) in zip(children, children[1:]):
            if (isinstance(child, nn.Conv2d) and isinstance(following, nn.BatchNorm2d)
                    and following.num_features == child.out_channels):
                found[f"{parent_name}.{name}" if parent_name else name] = following
    return found


def _batchnorm_factor(norm: nn.BatchNorm2d) -> torch.Tensor:
    return (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach()


def folded_layer_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<block>.mlp.fc2`` -> the block's ``layer_scale_2``, which multiplies the MLP's output,
    i.e. ``fc2``'s (Core ML's converter folds it into the kernel: ``backends/coreml/layer_map``).
    ``layer_scale_1`` multiplies the attention's upsampled output, which no converter folds."""
    found = {}
    for name, block in model.named_modules():
        scale = getattr(block, "layer_scale_2", None)
        fc2 = getattr(getattr(block, "mlp", None), "fc2", None)
        if (isinstance(scale, torch.Tensor) and isinstance(fc2, (nn.Conv2d, nn.Linear))
                and scale.numel() == fc2.weight.shape[0]):
            found[f"{name}.mlp.fc2"] = scale.detach().flatten()
    return found


def channel_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layer name -> the per-output-channel factor exporters fold into its kernel (a following
    BatchNorm's ``weight / sqrt(var + eps)``, or a layer scale)."""
    factors = {name: _batchnorm_factor(norm) for name, norm in folded_batchnorms(model).items()}
    factors.update(folded_layer_scales(model))
    return factors


def _per_channel(factor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return factor.view((-1,) + (1,) * (weight.dim() - 1))


def stored_weight(module: nn.Module, factor: torch.Tensor | None = None,
                  fold_identity: bool = True) -> torch.Tensor:
    """The kernel as a backend stores it: ``factor`` (``channel_factors``) folded in and, where
    ``fold_identity``, a ``ResidualDepthwiseConv2d``'s identity."""
    weight = module.weight.detach()
    if fold_identity and isinstance(module, ResidualDepthwiseConv2d):
        weight = module.folded_weight().detach()
    if factor is not None:
        weight = weight * _per_channel(factor, weight)
    return weight


def unfolded_weight(module: nn.Module, factor: torch.Tensor | None, fold_identity: bool,
                    stored: torch.Tensor) -> torch.Tensor:
    """The parameter value that makes ``module`` (with its BatchNorm or layer scale after it)
    compute with the kernel ``stored``; a channel whose factor is 0 computes 0 whatever its
    weight."""
    if factor is not None:
        stored = stored / _per_channel(torch.where(factor != 0, factor, torch.ones_like(factor)),
                                       stored)
    if fold_identity and isinstance(module, ResidualDepthwiseConv2d):
        stored = stored - module.identity
    return stored


# ----------------------------------------------------------------------------- the model
class FakeQuantizer:
    """Applies an assignment {layer name: precision} to a deploy-form model.

    ``with quantizer.applied(assignment, scheme): model(x)`` runs the model with those layers
    fake-quantized as ``scheme``'s backends store them (``stays_float``, the folds); the model is
    restored on leaving. Fake-quantized weights are computed once per layer, precision and
    stored form; activation ranges come from ``calibrate_ranges`` (needed only for ``int8``
    under the ``int8`` scheme)."""

    def __init__(self, deployed: nn.Module, ranges: Mapping[str, ActivationRange] | None = None):
        self.deployed = deployed
        self.layers = {layer.name: layer for layer in quantizable_layers(deployed)}
        self.modules = layer_modules(deployed)
        self.ranges = dict(ranges or {})
        self._factors = channel_factors(deployed)
        self._fake: dict[tuple[str, str, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self._inputs: dict[str, ActivationRange] = {}
        self._handles = [module.register_forward_pre_hook(self._input_hook(name))
                         for name, module in self.modules.items()]

    def _input_hook(self, name: str):
        def hook(_module, inputs):
            quantized = self._inputs.get(name)
            if quantized is None:
                return None
            return (quantized.fake_quantize(inputs[0]), *inputs[1:])
        return hook

    def compressed(self, name: str, precision: str, scheme: str) -> bool:
        """Whether layer ``name`` at ``precision`` gets fake-quantized weights under ``scheme``."""
        return not stays_float(self.layers[name], precision, scheme)

    def fake_weight(self, name: str, precision: str, scheme: str) -> torch.Tensor:
        """The parameter value of layer ``name`` with its stored kernel at ``precision``."""
        return self._quantized(name, precision, scheme)[0]

    def stored_fake_weight(self, name: str, precision: str, scheme: str) -> torch.Tensor:
        """The stored kernel of layer ``name`` at ``precision`` (what a backend would hold)."""
        return self._quantized(name, precision, scheme)[1]

    def _quantized(self, name: str, precision: str,
                   scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
        fold_identity = folds_residual_identity(scheme)
        key = (name, precision, fold_identity)
        if key not in self._fake:
            module, factor = self.modules[name], self._factors.get(name)
            with torch.no_grad():
                stored = WEIGHT_FORMATS[precision](stored_weight(module, factor, fold_identity))
                parameter = unfolded_weight(module, factor, fold_identity, stored)
                self._fake[key] = (parameter.contiguous(), stored)
        return self._fake[key]

    @contextmanager
    def applied(self, assignment: Mapping[str, str], scheme: str) -> Iterator[None]:
        unknown = [name for name in assignment if name not in self.modules]
        if unknown:
            raise ValueError(f"not a layer of this model: {unknown[0]!r}")
        originals = {}
        try:
            for name, precision in assignment.items():
                check_precision(precision)
                if not self.compressed(name, precision, scheme):
                    continue
                weight = self.modules[name].weight
                originals[name] = weight.data
                weight.data = self.fake_weight(name, precision, scheme)
                if quantizes_inputs(scheme, precision):
                    if name not in self.ranges:
                        raise ValueError(f"no calibrated input range for {name}: int8 "
                                         f"activations need calibrate_ranges first")
                    self._inputs[name] = self.ranges[name]
            yield
        finally:
            for name, data in originals.items():
                self.modules[name].weight.data = data
            self._inputs.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
