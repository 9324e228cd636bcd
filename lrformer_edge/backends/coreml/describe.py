"""What a Core ML package is, read without running it (any OS): the gate's precision key."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lrformer_edge.artifacts.precision_config import METADATA_KEY
from lrformer_edge.backends.base import ArtifactDescription
from lrformer_edge.backends.coreml.export import PRECISIONS, WEIGHT_MODES
from lrformer_edge.backends.coreml.runner import CoreMLRunner

# Weights set layer by layer by a precision config: one key whatever the scheme, whose limits
# are those of the coarsest scheme (a mixed package is never coarser than its scheme).
MIXED = "mixed"


def precision_key(precision: str, weights: str, w8a8: bool, mixed: bool = False) -> str:
    """Compute precision (or "w8a8"), plus compressed weights: "fp16", "fp16+int8", "w8a8",
    "fp16+mixed" (a precision config's package)."""
    compute = "w8a8" if w8a8 else precision
    if mixed:
        return f"{compute}+{MIXED}"
    return compute if weights == "float" else f"{compute}+{weights}"


# W8A8 runs its float parts in fp16 and stores int8 weights: never 4-bit (CoreMLOptions), nor
# mixed (a precision config is weight-only).
PRECISION_KEYS = (
    *(precision_key(precision, weights, False) for precision in PRECISIONS
      for weights in WEIGHT_MODES),
    *(precision_key(precision, "float", False, mixed=True) for precision in PRECISIONS),
    *(precision_key("fp16", weights, True) for weights in ("float", "int8")),
)


def describe_package(path: Path, options: Mapping) -> ArtifactDescription:
    metadata = CoreMLRunner(path).metadata
    exported = metadata.get("coreml_options") or {}
    return ArtifactDescription(
        "coreml", precision_key(exported.get("precision", "fp16"),
                                exported.get("weights", "float"), bool(exported.get("w8a8")),
                                mixed=bool(metadata.get(METADATA_KEY))),
        metadata=metadata)
