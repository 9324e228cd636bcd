"""``to_deploy(model, input_size)``: the explicit conversion to a fixed-resolution, exportable form.

The official LRSA pools with ``F.adaptive_avg_pool2d`` to grids that depend on the input's aspect
ratio and rarely divide the feature map; ONNX cannot express that, and mmdeploy's usual rewrite
(``avg_pool`` with kernel ``size // out``) is only approximate. Here every pooling becomes its
exact static equivalent for the chosen input size:

* ``AveragePool`` (kernel = stride = size / out) where the grid divides the feature map;
* otherwise two constant averaging matrices, ``P_h @ X @ P_w^T``, whose rows hold exactly the
  bins adaptive pooling averages (``floor(i*n/m) .. ceil((i+1)*n/m)``) — two MatMuls;

attention runs through ``scaled_dot_product_attention`` (which backends fuse), and every size is a
Python constant fixed at conversion time. Parameters and their names are untouched (matrices are
non-persistent buffers), so ``state_dict()`` keys stay identical, and converting a converted model
again (for another size) is safe.
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
    HeadLowResolutionAttention,
    LowResolutionAttention,
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
            self.register_buffer("rows_t", torch.from_numpy(adaptive_pool_matrix(H, h).T).float(),
                                 persistent=False)
            self.register_buffer("cols_t", torch.from_numpy(adaptive_pool_matrix(W, w).T).float(),
                                 persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.divides:
            if self.kernel == (1, 1):
                return x
            return F.avg_pool2d(x, self.kernel, self.kernel)
        # Both products multiply by a 2-D right operand: one GEMM each, on every backend.
        pooled_cols = torch.matmul(x, self.cols_t)  # (B, C, H, w)
        return torch.matmul(pooled_cols.transpose(-1, -2), self.rows_t).transpose(-1, -2)

    def extra_repr(self) -> str:
        mode = f"avg_pool {self.kernel}" if self.divides else "averaging matrices"
        return f"{self.in_size} -> {self.out_size}, {mode}"


class _StaticAttentionMixin:
    """Fixed-size pooling, static upsampling and fused attention for an LRSA module."""

    feature_size: tuple[int, int]

    @classmethod
    def from_module(cls, module: LowResolutionAttention, feature_size):
        """The static twin of ``module`` for ``feature_size``, sharing its parameters."""
        static = cls.__new__(cls)
        nn.Module.__init__(static)
        for name in ("dim", "num_heads", "scale", "q_pooled_size", "kv_pooled_sizes"):
            setattr(static, name, getattr(module, name))
        for name in ("q", "kv", "proj", "norm"):
            setattr(static, name, getattr(module, name))
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


class StaticLowResolutionAttention(_StaticAttentionMixin, LowResolutionAttention):
    """Backbone LRSA for one fixed feature-map size (same parameters, same names)."""

    def forward(self, x, height, width, d_convs):
        _check_size(self, height, width)
        return super().forward(x, *self.feature_size, d_convs)


class StaticHeadLowResolutionAttention(_StaticAttentionMixin, HeadLowResolutionAttention):
    """Decoder LRSA for one fixed feature-map size."""

    def spatial_size(self, x: torch.Tensor) -> tuple[int, int]:
        _check_size(self, x.shape[2], x.shape[3])
        return self.feature_size


def _check_size(module, height, width) -> None:
    if not torch.jit.is_tracing() and (int(height), int(width)) != module.feature_size:
        raise ValueError(
            f"this deploy-form model was converted for feature maps of {module.feature_size}, "
            f"got {(int(height), int(width))}; call to_deploy(model, input_size) for this size")


def _static_class_for(module: nn.Module):
    if isinstance(module, (StaticHeadLowResolutionAttention, HeadLowResolutionAttention)):
        return StaticHeadLowResolutionAttention
    return StaticLowResolutionAttention


def check_input_size(input_size) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise ValueError(f"input_size must be (height, width), got {input_size!r}") from None
    if height <= 0 or width <= 0 or height % INPUT_ALIGNMENT or width % INPUT_ALIGNMENT:
        aligned = tuple(max(INPUT_ALIGNMENT, math.ceil(v / INPUT_ALIGNMENT) * INPUT_ALIGNMENT)
                        for v in (height, width))
        raise ValueError(f"input_size {height}x{width} must be positive multiples of "
                         f"{INPUT_ALIGNMENT}; the nearest larger is {aligned[0]}x{aligned[1]}")
    return height, width


def to_deploy(model: LRFormerSegmentor, input_size, inplace: bool = False) -> LRFormerSegmentor:
    """A fixed-resolution, export-friendly copy of ``model`` for ``input_size`` = (H, W).

    Outputs equal the reference model's to float32 rounding at that size. ``state_dict()`` keys
    and values are unchanged; calling it on an already converted model re-targets the size.
    """
    if not isinstance(model, LRFormerSegmentor):
        raise TypeError(f"to_deploy expects an LRFormer model from create_model, got "
                        f"{type(model).__name__}")
    height, width = check_input_size(input_size)
    deployed = model if inplace else copy.deepcopy(model)
    stage_sizes = [(height // s, width // s) for s in (4, 8, 16, 32)]
    for stage, size in enumerate(stage_sizes, start=1):
        for block in getattr(deployed.backbone, f"block{stage}"):
            block.attn = _static_class_for(block.attn).from_module(block.attn, size)
    head = deployed.decode_head
    head_size = stage_sizes[head.in_index[0]]
    for block in (head.fuse_block1, head.fuse_block2):
        block.attn = _static_class_for(block.attn).from_module(block.attn, head_size)
    deployed.deploy_input_size = (height, width)
    return deployed.eval()
