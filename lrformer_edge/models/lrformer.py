"""Reference LRFormer: backbone, LRHead decoder and the whole-image segmentor.

Faithful to the official release (mmsegmentation-based, Wu et al. TPAMI 2025) in module names
(so official checkpoints load strictly), in eval-mode numerics and in the order of operations,
with no mmcv/mmseg/mmengine dependency. Eval-only differences: SyncBN is BatchNorm2d, dropout and
drop-path are identities. The export-friendly form lives in ``models/deploy.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lrformer_edge.registry import ArchConfig

# The official code adds this before rounding so that an exact ``x.5`` is never hit by chance.
POOL_ROUND_EPS = 0.001
INPUT_ALIGNMENT = 32


def pooled_size(height: int, width: int, base: int) -> tuple[int, int]:
    """Aspect-ratio aware pooled grid: ``base`` along the shorter side (official rule)."""
    if width >= height:
        return base, round(width * float(base) / height + POOL_ROUND_EPS)
    return round(height * float(base) / width + POOL_ROUND_EPS), base


class DropPath(nn.Module):
    """Stochastic depth (per-sample residual dropout); identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class InvertedResidualMLP(nn.Module):
    """1x1 expand -> GELU -> (x + depthwise 3x3) -> 1x1 project, on NCHW maps."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = x + self.conv(x)
        return self.fc2(x)


def tokens_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C)."""
    return x.flatten(2).transpose(1, 2)


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Plain softmax attention on (B, heads, N, d) tensors, as the official code computes it."""
    attn = (q @ k.transpose(-2, -1)) * scale
    return attn.softmax(dim=-1) @ v


class LowResolutionAttention(nn.Module):
    """LRSA of the backbone: attention computed entirely in a fixed low-resolution space.

    Queries are average-pooled to a ``q_pooled_size`` grid (aspect-ratio aware), keys/values
    come from a pyramid of pooled grids, each refined by the stage's shared depthwise conv, and
    the attended result is bilinearly upsampled back to the feature map.
    ``forward`` works on tokens (B, N, C) with the map size given, ``forward_map`` on NCHW maps.
    """

    def __init__(self, dim: int, num_heads: int, q_pooled_size: int,
                 kv_pooled_sizes: tuple[int, ...]):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_pooled_size = q_pooled_size
        self.kv_pooled_sizes = tuple(kv_pooled_sizes)
        # Sequential wrappers keep the official key names (``attn.q.0.weight``).
        self.q = nn.Sequential(nn.Linear(dim, dim))
        self.kv = nn.Sequential(nn.Linear(dim, dim * 2))
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def pool(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, size)

    def upsample(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return multi_head_attention(q, k, v, self.scale)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C/heads)."""
        batch, tokens, channels = x.shape
        return x.reshape(batch, tokens, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, height: int, width: int,
                d_convs: nn.ModuleList) -> torch.Tensor:
        return map_to_tokens(self.forward_map(tokens_to_map(x, height, width), d_convs))

    def forward_map(self, feature_map: torch.Tensor, d_convs: nn.ModuleList) -> torch.Tensor:
        """The same attention on an NCHW map, returning the NCHW map."""
        batch, channels = feature_map.shape[0], self.dim
        height, width = self.spatial_size(feature_map)

        q_grid = pooled_size(height, width, self.q_pooled_size)
        q = map_to_tokens(self.pool(feature_map, q_grid))
        q = self.split_heads(self.q(q))

        pyramid = []
        for base, d_conv in zip(self.kv_pooled_sizes, d_convs):
            pooled = self.pool(feature_map, pooled_size(height, width, base))
            pyramid.append((pooled + d_conv(pooled)).flatten(2))
        pyramid = self.norm(torch.cat(pyramid, dim=2).transpose(1, 2))
        k, v = self.kv(pyramid).chunk(2, dim=-1)

        out = self.attend(q, self.split_heads(k), self.split_heads(v))
        out = self.proj(out.transpose(1, 2).reshape(batch, -1, channels))
        return self.upsample(tokens_to_map(out, *q_grid), (height, width))

    def spatial_size(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[2], x.shape[3]


class BackboneBlock(nn.Module):
    """Depthwise conditional position encoding, then LRSA and the inverted-residual MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, layer_scale: bool,
                 q_pooled_size: int, kv_pooled_sizes: tuple[int, ...], drop_path: float = 0.0):
        super().__init__()
        if layer_scale:
            self.layer_scale_1 = nn.Parameter(torch.full((dim,), 1e-6))
            self.layer_scale_2 = nn.Parameter(torch.full((dim,), 1e-6))
        else:
            self.layer_scale_1 = self.layer_scale_2 = None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = LowResolutionAttention(dim, num_heads, q_pooled_size, kv_pooled_sizes)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = InvertedResidualMLP(dim, int(dim * mlp_ratio))
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, height: int, width: int,
                d_convs: nn.ModuleList) -> torch.Tensor:
        feature_map = tokens_to_map(x, height, width)
        x = map_to_tokens(self.cpe(feature_map) + feature_map)
        attn = self.attn(self.norm1(x), height, width, d_convs)
        if self.layer_scale_1 is not None:
            attn = self.layer_scale_1 * attn
        x = x + self.drop_path(attn)
        mlp = map_to_tokens(self.mlp(tokens_to_map(self.norm2(x), height, width)))
        if self.layer_scale_2 is not None:
            mlp = self.layer_scale_2 * mlp
        return x + self.drop_path(mlp)


class Stem(nn.Module):
    """Four 3x3 convs (two of stride 2) -> LayerNorm: the stride-4 first patch embedding."""

    def __init__(self, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, mid, 3, 2, 1), nn.BatchNorm2d(mid), nn.GELU(),
            nn.Conv2d(mid, mid, 3, 1, 1), nn.BatchNorm2d(mid), nn.GELU(),
            nn.Conv2d(mid, out_channels, 3, 2, 1), nn.BatchNorm2d(out_channels), nn.GELU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1),
        )
        self.norm = nn.LayerNorm(out_channels, eps=1e-6)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.project(x)
        return self.norm(map_to_tokens(x)), x.shape[2], x.shape[3]


class OverlapPatchEmbed(nn.Module):
    """3x3 stride-2 conv -> LayerNorm."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.norm = nn.LayerNorm(out_channels, eps=1e-6)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.project(x)
        return self.norm(map_to_tokens(x)), x.shape[2], x.shape[3]


class LRFormerBackbone(nn.Module):
    """Four stages at strides 4, 8, 16, 32; returns the four NCHW feature maps."""

    def __init__(self, arch: ArchConfig, drop_path_rate: float = 0.0):
        super().__init__()
        dims = arch.embed_dims
        self.patch_embed1 = Stem(dims[0])
        self.patch_embed2 = OverlapPatchEmbed(dims[0], dims[1])
        self.patch_embed3 = OverlapPatchEmbed(dims[1], dims[2])
        self.patch_embed4 = OverlapPatchEmbed(dims[2], dims[3])
        for stage, dim in enumerate(dims, start=1):
            # One depthwise conv per pyramid level, shared by every block of the stage.
            convs = nn.ModuleList(
                nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in arch.kv_pooled_sizes
            )
            setattr(self, f"d_convs{stage}", convs)
        rates = torch.linspace(0, drop_path_rate, sum(arch.depths)).tolist()
        first = 0
        for stage, (dim, depth) in enumerate(zip(dims, arch.depths), start=1):
            blocks = nn.ModuleList(
                BackboneBlock(
                    dim, arch.num_heads[stage - 1], arch.mlp_ratios[stage - 1],
                    layer_scale=stage >= 3, q_pooled_size=arch.q_pooled_size,
                    kv_pooled_sizes=arch.kv_pooled_sizes, drop_path=rates[first + i],
                )
                for i in range(depth)
            )
            setattr(self, f"block{stage}", blocks)
            first += depth

    def stages(self):
        for stage in range(1, 5):
            yield (getattr(self, f"patch_embed{stage}"), getattr(self, f"block{stage}"),
                   getattr(self, f"d_convs{stage}"))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for patch_embed, blocks, d_convs in self.stages():
            x, height, width = patch_embed(x)
            for block in blocks:
                x = block(x, height, width, d_convs)
            x = tokens_to_map(x, height, width)
            features.append(x)
        return features


class ConvBNReLU(nn.Module):
    """mmcv ConvModule(kernel 1, norm=BN, act=ReLU): the conv has no bias."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class HeadLowResolutionAttention(LowResolutionAttention):
    """The decoder's LRSA: NCHW in and out, a 1x1-conv query, no depthwise convs on the pyramid."""

    def __init__(self, dim: int, num_heads: int, q_pooled_size: int,
                 kv_pooled_sizes: tuple[int, ...]):
        super().__init__(dim, num_heads, q_pooled_size, kv_pooled_sizes)
        self.q = nn.Conv2d(dim, dim, 1)
        self.kv = nn.Linear(dim, dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        batch, channels = x.shape[0], self.dim
        height, width = self.spatial_size(x)
        q_grid = pooled_size(height, width, self.q_pooled_size)
        q = self.split_heads(map_to_tokens(self.q(self.pool(x, q_grid))))

        pyramid = [self.pool(x, pooled_size(height, width, base)).flatten(2)
                   for base in self.kv_pooled_sizes]
        pyramid = self.norm(torch.cat(pyramid, dim=2).transpose(1, 2))
        k, v = self.kv(pyramid).chunk(2, dim=-1)

        out = self.attend(q, self.split_heads(k), self.split_heads(v))
        out = self.proj(out.transpose(1, 2).reshape(batch, -1, channels))
        return self.upsample(tokens_to_map(out, *q_grid), (height, width))


class HeadBlock(nn.Module):
    """The decoder's fuse block: BN-normalised LRSA and MLP with layer scale, on NCHW maps."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, q_pooled_size: int,
                 kv_pooled_sizes: tuple[int, ...]):
        super().__init__()
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), 1e-6))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), 1e-6))
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = HeadLowResolutionAttention(dim, num_heads, q_pooled_size, kv_pooled_sizes)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = InvertedResidualMLP(dim, dim * mlp_ratio)
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe(x) + x
        x = x + self.layer_scale_1[None, :, None, None] * self.attn(self.norm1(x))
        return x + self.layer_scale_2[None, :, None, None] * self.mlp(self.norm2(x))


class LRHead(nn.Module):
    """Concatenate stages 2-4 at 1/8 scale, squeeze, fuse, re-inject stage 4, fuse, classify."""

    def __init__(self, arch: ArchConfig, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.in_index = arch.head_in_index
        in_channels = [arch.embed_dims[i] for i in self.in_index]
        channels = arch.head_channels
        # The decoder's pyramid scales with its query grid (official: 11, 8, 6, 4 at 16).
        kv_sizes = tuple(round(s * arch.head_q_pooled_size / 16.0 + POOL_ROUND_EPS)
                         for s in arch.kv_pooled_sizes)
        # Created first, as mmseg's BaseDecodeHead does, so state_dict order matches releases.
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.squeeze1 = ConvBNReLU(sum(in_channels), channels)
        self.squeeze2 = ConvBNReLU(channels + in_channels[-1], channels)
        self.fuse_block1 = HeadBlock(channels, arch.head_num_heads, arch.head_mlp_ratio,
                                     arch.head_q_pooled_size, kv_sizes)
        self.fuse_block2 = HeadBlock(channels, arch.head_num_heads, arch.head_mlp_ratio,
                                     arch.head_q_pooled_size, kv_sizes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        selected = [features[i] for i in self.in_index]
        size = selected[0].shape[2:]
        selected = [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                    for f in selected]
        x = self.fuse_block1(self.squeeze1(torch.cat(selected, dim=1)))
        x = self.fuse_block2(self.squeeze2(torch.cat((x, selected[-1]), dim=1)))
        return self.conv_seg(self.dropout(x))


class LRFormerSegmentor(nn.Module):
    """Backbone + LRHead, as mmseg's EncoderDecoder in ``whole`` test mode.

    ``forward`` takes normalised pixels (B, 3, H, W), H and W multiples of 32, and returns
    logits (B, num_classes, H, W): the 1/8-scale head logits bilinearly resized.
    """

    def __init__(self, arch: ArchConfig, num_classes: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.backbone = LRFormerBackbone(arch, drop_path_rate)
        self.decode_head = LRHead(arch, num_classes)

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of shape (B, 3, H, W), got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected input of shape (B, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input (normalised pixels), got {x.dtype}")
        height, width = x.shape[2], x.shape[3]
        fixed = getattr(self, "deploy_input_size", None)
        if fixed is not None and (height, width) != fixed and not torch.jit.is_tracing():
            raise ValueError(
                f"this deploy-form model takes {fixed[0]}x{fixed[1]} inputs, got {height}x{width}; "
                f"convert the reference model again with to_deploy(model, ({height}, {width}))")
        if height % INPUT_ALIGNMENT or width % INPUT_ALIGNMENT:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of {INPUT_ALIGNMENT} on both sides; "
                f"resize or pad it first, e.g. with lrformer_edge.preprocess(...) or "
                f"aligned_size(), which gives {aligned_dim(height)}x{aligned_dim(width)}"
            )

    def forward_head_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.decode_head(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_head_logits(x)
        size = getattr(self, "deploy_input_size", None) or x.shape[2:]
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def aligned_dim(size: int, divisor: int = INPUT_ALIGNMENT) -> int:
    return int(math.ceil(size / divisor)) * divisor
