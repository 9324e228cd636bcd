"""The JSON sidecar written next to every TensorRT engine (precision, TensorRT version, GPU,
source ONNX hash, metadata): engines carry no metadata of their own."""
from __future__ import annotations

import json
from pathlib import Path

SIDECAR_SUFFIX = ".json"


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + SIDECAR_SUFFIX)


def read_sidecar(engine: str | Path) -> dict:
    path = sidecar_path(engine)
    if not path.is_file():
        raise ValueError(f"{engine} has no sidecar {path.name}; engines built by lrformer-edge "
                         f"carry one (metadata, TensorRT version, GPU)")
    return json.loads(path.read_text())


