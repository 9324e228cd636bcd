"""What every artifact records, so a runner, the harness or a person can tell what it is."""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone

import lrformer_edge

METADATA_PREFIX = "lrformer_edge."
UNTRAINED = "none (untrained)"  # the checkpoint_sha256 of a model without a checkpoint


def checkpoint_record(model) -> str:
    """The ``checkpoint_sha256`` an artifact exported from ``model`` records."""
    return getattr(model, "checkpoint_sha256", None) or UNTRAINED


def artifact_metadata(model, input_size, **extra) -> dict[str, str]:
    """Flat string metadata (ONNX metadata_props, OpenVINO rt_info, CoreML user metadata).

    ``requested_variant`` is there only when it differs from ``variant``: the checkpoint's class
    count chose another variant than the one asked for (``create_model``)."""
    import torch

    config = model.config
    data = config.data
    requested = getattr(model, "requested_variant", None)
    values = {
        "variant": config.name,
        **({"requested_variant": requested} if requested not in (None, config.name) else {}),
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
        "palette": [list(c) for c in data.palette],
        "mean": list(data.mean),
        "std": list(data.std),
        "input_size": list(input_size),
        "input_layout": "NCHW float32, RGB, (pixel - mean) / std",
        "output": "logits (N, num_classes, H, W) at input resolution",
        "checkpoint_sha256": checkpoint_record(model),
        "toolkit_version": lrformer_edge.__version__,
        "torch_version": torch.__version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.platform(),
        **extra,
    }
    return {METADATA_PREFIX + k: v if isinstance(v, str) else json.dumps(v)
            for k, v in values.items()}


def decode_metadata(props: dict[str, str]) -> dict:
    """Inverse of ``artifact_metadata`` (prefix stripped, JSON values decoded)."""
    decoded = {}
    for key, value in props.items():
        if not key.startswith(METADATA_PREFIX):
            continue
        try:
            decoded[key[len(METADATA_PREFIX):]] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            decoded[key[len(METADATA_PREFIX):]] = value
    return decoded


def data_config_from_metadata(metadata: dict):
    """The preprocessing/label DataConfig an artifact was exported with."""
    from lrformer_edge.registry import DataConfig

    missing = [k for k in ("class_names", "palette", "mean", "std") if k not in metadata]
    if missing:
        raise ValueError(f"artifact metadata lacks {missing}; was it exported by lrformer-edge?")
    # An artifact without a recorded size keeps DataConfig's own default native size.
    size = {"native_size": tuple(metadata["input_size"])} if "input_size" in metadata else {}
    return DataConfig(str(metadata.get("variant", "artifact")), tuple(metadata["class_names"]),
                      tuple(tuple(c) for c in metadata["palette"]), tuple(metadata["mean"]),
                      tuple(metadata["std"]), **size)
