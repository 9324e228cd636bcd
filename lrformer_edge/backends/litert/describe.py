"""What a LiteRT model is, read without running it: the gate's precision key, from the metadata
the ``.tflite`` carries."""
from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

from lrformer_edge.backends.base import ArtifactDescription
from lrformer_edge.backends.litert.format import INSTALL, read_tflite_metadata

# What each part of the target needs: the runner only the interpreter, the export all three.
RUNTIME_PACKAGES = ("ai_edge_litert",)
EXPORT_PACKAGES = ("ai_edge_litert", "litert_torch", "ai_edge_quantizer")


def missing_packages(packages=RUNTIME_PACKAGES) -> list[str]:
    return [name for name in packages if importlib.util.find_spec(name) is None]


def litert_unavailable_reason(packages=RUNTIME_PACKAGES) -> str | None:
    missing = missing_packages(packages)
    if missing:
        return (f"the Python package{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(name) for name in missing)} "
                f"{'are' if len(missing) > 1 else 'is'} not installed; run: {INSTALL}")
    return None


def describe_model(path: Path, options: Mapping) -> ArtifactDescription:
    metadata = read_tflite_metadata(path)
    return ArtifactDescription("litert", metadata.get("precision", "fp32"), dict(options),
                               metadata)
