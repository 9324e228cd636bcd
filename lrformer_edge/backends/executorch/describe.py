"""What an ExecuTorch program is, read without running it: the gate's precision key, from the
metadata the ``.pte`` carries."""
from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

from lrformer_edge.backends.base import ArtifactDescription
from lrformer_edge.backends.executorch.format import INSTALL, read_pte_metadata


def executorch_unavailable_reason() -> str | None:
    if importlib.util.find_spec("executorch") is None:
        return f"the Python package 'executorch' is not installed; run: {INSTALL}"
    return None


def describe_program(path: Path, options: Mapping) -> ArtifactDescription:
    metadata = read_pte_metadata(path)
    return ArtifactDescription("executorch", metadata.get("precision", "fp32"), dict(options),
                               metadata)
