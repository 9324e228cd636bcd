"""PyTorch checkpoints: the FP32 ground truth every other backend is measured against."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lrformer_edge.artifacts.runner import Runner
from lrformer_edge.backends.base import (
    ArtifactDescription,
    Backend,
    check_variant_matches,
)
from lrformer_edge.backends.pytorch import benchmark
from lrformer_edge.files import CHECKPOINT_SUFFIXES


def open_runner(path: Path, variant: str | None = None, **options) -> Runner:
    """A TorchRunner for a checkpoint, built as the variant it records or ``variant``."""
    # PyTorch loads here, not with the registry: devices that gate with a saved reference lack it.
    from lrformer_edge.backends.pytorch.runner import TorchRunner
    from lrformer_edge.models.checkpoint import checkpoint_variant
    from lrformer_edge.models.factory import create_model

    recorded = checkpoint_variant(path)
    check_variant_matches(path, variant, recorded)  # before building the wrong model
    variant = variant or recorded
    if variant is None:
        raise ValueError(f"{path} does not record its variant (official checkpoints do not): "
                         f"name it, e.g. load_runner(path, variant='lrformer-t')")
    return TorchRunner(create_model(variant, checkpoint=path), **options)


def describe(path: Path, options: Mapping) -> ArtifactDescription:
    return ArtifactDescription("pytorch", "fp32")


BACKEND = Backend(
    name="pytorch", title="PyTorch checkpoint", suffixes=CHECKPOINT_SUFFIXES,
    precisions=("fp32",), precision_keys=("fp32",), extra=None,
    open_runner=open_runner, describe=describe,
    benchmark_candidates=benchmark.candidates,
)
