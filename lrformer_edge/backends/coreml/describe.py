"""What a Core ML package is, read without running it (any OS): the gate's precision key."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lrformer_edge.backends.base import ArtifactDescription
from lrformer_edge.backends.coreml.export import PRECISIONS, WEIGHT_MODES
from lrformer_edge.backends.coreml.runner import CoreMLRunner


def precision_key(precision: str, weights: str, w8a8: bool) -> str:
    """Compute precision (or "w8a8"), plus compressed weights: "fp16", "fp16+int8", "w8a8"."""
    compute = "w8a8" if w8a8 else precision
    return compute if weights == "float" else f"{compute}+{weights}"


# W8A8 runs its float parts in fp16 and stores int8 weights: never palettised (CoreMLOptions).
PRECISION_KEYS = (
    *(precision_key(precision, weights, False) for precision in PRECISIONS
      for weights in WEIGHT_MODES),
    *(precision_key("fp16", weights, True) for weights in WEIGHT_MODES if weights != "palette4"),
)


def describe_package(path: Path, options: Mapping) -> ArtifactDescription:
    metadata = CoreMLRunner(path).metadata
    exported = metadata.get("coreml_options") or {}
    return ArtifactDescription(
        "coreml", precision_key(exported.get("precision", "fp16"),
                                exported.get("weights", "float"), bool(exported.get("w8a8"))),
        metadata=metadata)
