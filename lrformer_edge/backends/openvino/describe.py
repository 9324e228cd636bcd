"""What an OpenVINO IR is, read without running it: the gate's precision key and runner options."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lrformer_edge.backends.base import ArtifactDescription
from lrformer_edge.backends.openvino.ir import IR_PRECISIONS
from lrformer_edge.backends.openvino.runner import (
    DEFAULT_PRECISION,
    PRECISIONS,
    OpenVINORunner,
)


def precision_key(weights: str, hint: str) -> str:
    """IR weights, plus the inference hint when it is not f32: "int8", "int8+bf16"."""
    return weights if hint == DEFAULT_PRECISION else f"{weights}+{hint}"


PRECISION_KEYS = tuple(precision_key(weights, hint) for weights in IR_PRECISIONS
                       for hint in PRECISIONS)


def is_ir_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.xml"))


def describe_ir(path: Path, options: Mapping) -> ArtifactDescription:
    metadata = OpenVINORunner(path).metadata
    return ArtifactDescription(
        "openvino", precision_key(metadata.get("weights_precision", "fp32"), options["precision"]),
        dict(options), metadata)
