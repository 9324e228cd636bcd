"""``to_deploy(model, input_size)``: the explicit conversion to a fixed-resolution, exportable form.

The official LRSA pools with ``F.adaptive_avg_pool2d`` to grids that depend on the input's aspect
ratio and rarely divide the feature map; ONNX cannot express that, and mmdeploy's usual rewrite
(``avg_pool`` with kernel ``size // out``) is only approximate. Here every pooling becomes its
exact static equivalent for the chosen input size:

* ``AveragePool`` (kernel = stride = size / out) where the grid divides the feature map;
* otherwise two constant averaging matrices, ``P_h @ X @ P_w^T``, whose rows hold exactly the
  bins adaptive pooling averages (``floor(i*n/m) .. ceil((i+1)*n/m)``) — two MatMuls;

attention runs through ``scaled_dot_product_attention`` (which backends fuse), and every size is a
Python constant fixed at conversion time.

The reference backbone, like the official code, keeps its state as tokens (B, N, C) and turns it
into an NCHW map and back around every convolution: six full-resolution transposes per block,
which inference engines execute as memory copies (OpenVINO spent about a fifth of its INT8 time
on them). The deploy backbone keeps NCHW maps from stem to head and applies each LayerNorm over
the channel axis instead; the arithmetic is the same, element for element.

``fold_mlp_residuals`` (default): in every MLP, ``h + dwconv(h)`` becomes one depthwise
convolution whose centre tap is one larger (the identity is added to the kernel in ``forward``,
so the stored weights stay the official ones and exporters fold it into one constant). The
hidden map, the widest tensor of the network, is then read once instead of three times, and an
int8 engine writes it as int8 straight from the first 1x1 convolution (OpenVINO INT8: about 15%
faster). The price is resolution in the folded kernel's low-precision forms (its int8 scale and
fp16 centre tap now span 1 + w), so Core ML (fp16 weights) and QAT (NNCF quantizes only kernels
it sees as parameters) convert with ``fold_mlp_residuals=False``.

Parameters and their names are untouched (matrices and identity taps are non-persistent
buffers), so ``state_dict()`` keys and values stay identical, and converting a converted model
again (for another size, or with the other folding) is safe.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrformer_edge.models.lrformer import (
    INPUT_ALIGNMENT,
    BackboneBlock,
    HeadLowResolutionAttention,
    InvertedResidualMLP,
    LowResolutionAttention,
    LRFormerBackbone,
    LRFormerSegmentor,
    pooled_size,
)


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix whose row i averages the bin adaptive_avg_pool uses for output i."""
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil without floats
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class StaticPool(nn.Module):
    """Exact adaptive average pooling from a fixed (H, W) to a fixed (h, w) grid."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]):
        super().__init__()
        self.in_size, self.out_size = tuple(in_size), tuple(out_size)
        (H, W), (h, w) = self.in_size, self.out_size
        self.divides = H % h == 0 and W % w == 0
        if self.divides:
            self.kernel = (H // h, W // w)
        else:
            self.register_buffer("rows", torch.from_numpy(adaptive_pool_matrix(H, h)).float(),
                                 persistent=False)
            self.register_buffer("cols", torch.from_numpy(adaptive_pool_matrix(W, w)).float(),
                                 persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.divides:
            if self.kernel == (1, 1):
                return x
            return F.avg_pool2d(x, self.kernel, self.kernel)
        # Multiplying channels-last rows needs no transpose of the full-resolution map on engines
        # that hold it channels-last anyway (OpenVINO's CPU plugin, TensorRT); both products are
        # one GEMM with a constant left operand.
        (H, W), (h, w) = self.in_size, self.out_size
        batch, channels = x.shape[0], x.shape[1]
        rows_last = x.permute(0, 2, 3, 1).reshape(batch, H, W * channels)
        pooled_rows = torch.matmul(self.rows, rows_last).reshape(batch * h, W, channels)
        pooled = torch.matmul(self.cols, pooled_rows)  # (B*h, w, C)
        return pooled.reshape(batch, h, w, channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        mode = f"avg_pool {self.kernel}" if self.divides else "averaging matrices"
        return f"{self.in_size} -> {self.out_size}, {mode}"


class _StaticAttentionMixin:
    """Fixed-size pooling, static upsampling and fused attention for an LRSA module."""

    feature_size: tuple[int, int]

    @classmethod
    def from_module(cls, module: LowResolutionAttention, feature_size):
        """The static twin of ``module`` for ``feature_size``, sharing its parameters."""
        static = _adopt(cls, module)
        static._build_static(feature_size)
        return static

    def _build_static(self, feature_size: tuple[int, int]) -> None:
        height, width = feature_size
        self.feature_size = (height, width)
        grids = [pooled_size(height, width, self.q_pooled_size)]
        grids += [pooled_size(height, width, base) for base in self.kv_pooled_sizes]
        self.static_pools = nn.ModuleDict(
            {f"{h}x{w}": StaticPool(feature_size, (h, w)) for h, w in dict.fromkeys(grids)})

    def pool(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.static_pools[f"{size[0]}x{size[1]}"](x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # The official scale is SDPA's default: leaving it implicit lets converters emit a fused
        # attention op (Core ML's iOS18 scaled_dot_product_attention has no scale input).
        default = self.scale == q.shape[-1] ** -0.5
        return F.scaled_dot_product_attention(q, k, v, scale=None if default else self.scale)

    def spatial_size(self, x: torch.Tensor) -> tuple[int, int]:
        if not torch.jit.is_tracing() and tuple(x.shape[2:]) != self.feature_size:
            raise ValueError(
                f"this deploy-form model was converted for feature maps of {self.feature_size}, "
                f"got {tuple(x.shape[2:])}; call to_deploy(model, input_size) for this size")
        return self.feature_size


class StaticLowResolutionAttention(_StaticAttentionMixin, LowResolutionAttention):
    """Backbone LRSA for one fixed feature-map size (same parameters, same names)."""


class StaticHeadLowResolutionAttention(_StaticAttentionMixin, HeadLowResolutionAttention):
    """Decoder LRSA for one fixed feature-map size."""


def channel_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm`` over the channels of an NCHW map: the reference's token LayerNorm, in place.

    Written as reductions over axis 1 (the form Apple recommends for channels-first models too)
    rather than a LayerNorm between two permutes: engines then keep the map in their own
    channels-last layout, where the permuted form made OpenVINO copy it to planar and back.
    """
    mean = x.mean(1, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(1, keepdim=True)
    return centred / torch.sqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]


class DeployBackboneBlock(BackboneBlock):
    """The backbone block on NCHW maps: same parameters, same order of operations."""

    def forward(self, x: torch.Tensor, d_convs: nn.ModuleList) -> torch.Tensor:  # type: ignore[override]
        x = self.cpe(x) + x
        attn = self.attn.forward_map(channel_layer_norm(x, self.norm1), d_convs)
        if self.layer_scale_1 is not None:
            attn = self.layer_scale_1[:, None, None] * attn
        x = x + self.drop_path(attn)
        mlp = self.mlp(channel_layer_norm(x, self.norm2))
        if self.layer_scale_2 is not None:
            mlp = self.layer_scale_2[:, None, None] * mlp
        return x + self.drop_path(mlp)


class DeployBackbone(LRFormerBackbone):
    """The backbone with NCHW maps from stem to head (no token round trips)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for patch_embed, blocks, d_convs in self.stages():
            x = channel_layer_norm(patch_embed.project(x), patch_embed.norm)
            for block in blocks:
                x = block(x, d_convs)
            features.append(x)
        return features


class ResidualDepthwiseConv2d(nn.Conv2d):
    """``x + conv(x)`` for a 3x3 depthwise ``conv`` (padding 1), as a single convolution.

    The identity is a non-persistent buffer added to the kernel's centre tap in ``forward``:
    exporters fold it into one constant kernel, the stored weight stays the official one.
    """

    def _build_identity(self) -> None:
        if not (self.kernel_size == (3, 3) and self.padding == (1, 1) and self.stride == (1, 1)
                and self.groups == self.in_channels == self.out_channels):
            raise ValueError(f"expected a 3x3 depthwise convolution with padding 1, got {self}")
        identity = torch.zeros_like(self.weight)
        identity[:, :, 1, 1] = 1.0
        self.register_buffer("identity", identity, persistent=False)

    def folded_weight(self) -> torch.Tensor:
        return self.weight + self.identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.folded_weight(), self.bias)


class DeployInvertedResidualMLP(InvertedResidualMLP):
    """The MLP with its depthwise residual folded into the depthwise convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.conv(self.act(self.fc1(x))))


def _set_mlp_residual(block: nn.Module, fold: bool) -> None:
    folded = isinstance(block.mlp, DeployInvertedResidualMLP)
    if fold and not folded:
        block.mlp = _adopt(DeployInvertedResidualMLP, block.mlp)
        block.mlp.conv = _adopt(ResidualDepthwiseConv2d, block.mlp.conv)
        block.mlp.conv._build_identity()
    elif folded and not fold:
        block.mlp = _adopt(InvertedResidualMLP, block.mlp)
        block.mlp.conv = _adopt(nn.Conv2d, block.mlp.conv, drop_buffers=("identity",))


def _adopt(cls, module: nn.Module, drop_buffers: tuple[str, ...] = ()) -> nn.Module:
    """An instance of exactly ``cls`` holding ``module``'s own parameters, buffers and children."""
    if type(module) is cls:
        return module
    adopted = cls.__new__(cls)
    nn.Module.__init__(adopted)
    for key, value in vars(module).items():
        if key in ("_parameters", "_modules"):
            getattr(adopted, key).update(value)
        elif key == "_buffers":
            adopted._buffers.update((k, v) for k, v in value.items() if k not in drop_buffers)
        elif key == "_non_persistent_buffers_set":
            adopted._non_persistent_buffers_set.update(value - set(drop_buffers))
        elif not key.startswith("_"):
            adopted.__dict__[key] = value
    return adopted


def _static_class_for(module: nn.Module):
    if isinstance(module, (StaticHeadLowResolutionAttention, HeadLowResolutionAttention)):
        return StaticHeadLowResolutionAttention
    return StaticLowResolutionAttention


def check_input_size(input_size, name: str = "input_size") -> tuple[int, int]:
    """(height, width) as ints, both positive multiples of 32; ``name`` is used in the error."""
    try:
        height, width = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width), got {input_size!r}") from None
    if height <= 0 or width <= 0 or height % INPUT_ALIGNMENT or width % INPUT_ALIGNMENT:
        aligned = tuple(max(INPUT_ALIGNMENT, math.ceil(v / INPUT_ALIGNMENT) * INPUT_ALIGNMENT)
                        for v in (height, width))
        raise ValueError(f"{name} {height}x{width} must be positive multiples of "
                         f"{INPUT_ALIGNMENT}; the nearest larger is {aligned[0]}x{aligned[1]}")
    return height, width


def to_deploy(model: LRFormerSegmentor, input_size, inplace: bool = False,
              fold_mlp_residuals: bool = True) -> LRFormerSegmentor:
    """A fixed-resolution, export-friendly copy of ``model`` for ``input_size`` = (H, W).

    Outputs equal the reference model's to float32 rounding at that size. ``state_dict()`` keys
    and values are unchanged; calling it on an already converted model re-targets the size (and
    the MLP folding, see the module's docstring).
    """
    if not isinstance(model, LRFormerSegmentor):
        raise TypeError(f"to_deploy expects an LRFormer model from create_model, got "
                        f"{type(model).__name__}")
    height, width = check_input_size(input_size)
    deployed = model if inplace else copy.deepcopy(model)
    stage_sizes = [(height // s, width // s) for s in (4, 8, 16, 32)]
    deployed.backbone = _adopt(DeployBackbone, deployed.backbone)
    for stage, size in enumerate(stage_sizes, start=1):
        blocks = getattr(deployed.backbone, f"block{stage}")
        for index, block in enumerate(blocks):
            block = blocks[index] = _adopt(DeployBackboneBlock, block)
            block.attn = _static_class_for(block.attn).from_module(block.attn, size)
            _set_mlp_residual(block, fold_mlp_residuals)
    head = deployed.decode_head
    head_size = stage_sizes[head.in_index[0]]
    for block in (head.fuse_block1, head.fuse_block2):
        block.attn = _static_class_for(block.attn).from_module(block.attn, head_size)
        _set_mlp_residual(block, fold_mlp_residuals)
    deployed.deploy_input_size = (height, width)
    return deployed.eval()
