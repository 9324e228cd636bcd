"""Model registry: every variant is a small frozen config, and its preprocessing travels with it.

Names follow timm's ``architecture.tag`` convention: ``lrformer-t`` is LRFormer-T with the
ADE20K head (150 classes, as released), ``lrformer-t.cityscapes`` the same backbone with a
19-class Cityscapes head, and so on.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from lrformer_edge.data.classes import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    COCO_STUFF_CLASSES,
    PROCEDURAL_CLASSES,
    PROCEDURAL_PALETTE,
    distinct_palette,
)

IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ArchConfig:
    """Hyper-parameters of the backbone and the LRHead decoder (official defaults)."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    head_channels: int
    num_heads: tuple[int, int, int, int] = (2, 4, 10, 16)
    mlp_ratios: tuple[int, int, int, int] = (8, 8, 4, 4)
    q_pooled_size: int = 16
    kv_pooled_sizes: tuple[int, ...] = (11, 8, 6, 4)
    head_num_heads: int = 8
    head_mlp_ratio: int = 4
    head_q_pooled_size: int = 32
    head_in_index: tuple[int, ...] = (1, 2, 3)

    def __post_init__(self) -> None:
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if dim % heads:
                raise ValueError(f"embed dim {dim} is not divisible by {heads} heads")
        if self.head_channels % self.head_num_heads:
            raise ValueError(
                f"head channels {self.head_channels} not divisible by {self.head_num_heads} heads"
            )


@dataclass(frozen=True)
class DataConfig:
    """What a caller must know to feed the model and read its output."""

    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN_RGB  # RGB order, 0..255 pixel scale
    std: tuple[float, float, float] = IMAGENET_STD_RGB
    # Official test pipeline: rescale to fit (long, short) keeping the aspect ratio, then
    # resize each side up to a multiple of ``size_divisor`` (mmseg's AlignResize).
    test_scale: tuple[int, int] = (2048, 512)
    size_divisor: int = 32
    # The training crop size; the default input size for fixed-resolution exports.
    native_size: tuple[int, int] = (512, 512)
    ignore_index: int = 255
    reduce_zero_label: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __post_init__(self) -> None:
        if len(self.palette) != len(self.class_names):
            raise ValueError(
                f"{self.name}: {len(self.palette)} palette colours for {len(self.class_names)} classes"
            )


@dataclass(frozen=True)
class ModelConfig:
    name: str
    arch: ArchConfig
    data: DataConfig
    description: str = ""
    official_config: str = ""
    default_checkpoint: str | None = field(default=None, compare=False)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes


ADE20K = DataConfig("ade20k", ADE20K_CLASSES, distinct_palette(150), reduce_zero_label=True)
ADE20K_640 = replace(ADE20K, test_scale=(2560, 640), native_size=(640, 640))
CITYSCAPES = DataConfig(
    "cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE,
    test_scale=(2048, 1024), native_size=(1024, 1024),
)
COCO_STUFF = DataConfig("coco-stuff", COCO_STUFF_CLASSES, distinct_palette(171))

PROCEDURAL = DataConfig("procedural", PROCEDURAL_CLASSES, PROCEDURAL_PALETTE,
                        reduce_zero_label=True)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUNDLED_MODEL = "lrformer-t.procedural"

_ARCHS = {
    "lrformer-t": (ArchConfig((48, 96, 240, 384), (2, 2, 6, 3), head_channels=256), ADE20K,
                   "lrformer-t-160k_ade20k"),
    "lrformer-s": (ArchConfig((64, 128, 320, 512), (3, 3, 12, 3), head_channels=384), ADE20K,
                   "lrformer-s-160k_ade20k"),
    "lrformer-b": (ArchConfig((80, 160, 400, 512), (4, 4, 15, 8), head_channels=512), ADE20K,
                   "lrformer-b-160k_ade20k"),
    "lrformer-l": (ArchConfig((96, 192, 480, 640), (4, 6, 18, 8), head_channels=640), ADE20K_640,
                   "lrformer-l-160k_ade20k"),
}

# A deliberately small model with the full topology, for fast tests of every code path.
TEST_ARCH = ArchConfig(
    (16, 32, 40, 64), (1, 1, 1, 1), head_channels=32,
    num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2), head_num_heads=2, head_mlp_ratio=2,
)

_REGISTRY: dict[str, ModelConfig] = {}


def register(config: ModelConfig) -> ModelConfig:
    if config.name in _REGISTRY:
        raise ValueError(f"model {config.name!r} is already registered")
    _REGISTRY[config.name] = config
    return config


def _register_defaults() -> None:
    for arch_name, (arch, ade, official) in _ARCHS.items():
        register(ModelConfig(arch_name, arch, ade, f"{arch_name.upper()} ADE20K (150 classes)",
                             official))
        register(ModelConfig(f"{arch_name}.cityscapes", arch, CITYSCAPES,
                             f"{arch_name.upper()} Cityscapes (19 classes)"))
        register(ModelConfig(f"{arch_name}.coco-stuff", arch, COCO_STUFF,
                             f"{arch_name.upper()} COCO-Stuff 164k (171 classes)"))
    register(ModelConfig(
        BUNDLED_MODEL, _ARCHS["lrformer-t"][0], PROCEDURAL,
        "LRFormer-T trained on the procedural street scenes (the bundled default model)",
        default_checkpoint=str(WEIGHTS_DIR / "lrformer-t.procedural.safetensors")))
    register(ModelConfig("lrformer-test", TEST_ARCH, ADE20K,
                         "tiny LRFormer with the full topology, for tests"))


_register_defaults()


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names, optionally filtered by a shell-style pattern."""
    import fnmatch

    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def get_config(name: str) -> ModelConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; registered models: {', '.join(list_models())}"
        ) from None


def input_size_of(model_or_config, input_size=None) -> tuple[int, int]:
    """The input size to use: ``input_size`` where given, else the variant's native size (its
    training crop). Every exporter, runner and command takes its default size from here.

    ``model_or_config``: a model from ``create_model``, a ModelConfig or a DataConfig."""
    if input_size:
        return tuple(int(v) for v in input_size)
    config = getattr(model_or_config, "config", model_or_config)
    data = getattr(config, "data", config)
    return tuple(data.native_size)


def with_num_classes(config: ModelConfig, num_classes: int) -> ModelConfig:
    """The same architecture with a head for ``num_classes`` (e.g. for a custom checkpoint).

    Class names become ``class_<i>`` and the palette a generated one, since we cannot know them.
    """
    if num_classes == config.num_classes:
        return config
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    data = replace(
        config.data,
        name=f"{config.data.name}-custom{num_classes}",
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        palette=distinct_palette(num_classes),
    )
    return replace(config, data=data, name=f"{config.name}[{num_classes} classes]")
