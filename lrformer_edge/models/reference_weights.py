"""Deterministic, hash-derived weights used by the official golden outputs.

``shared/reference/README.md`` defines them: every value comes from its key, shape and index
through integer hashing and float64 maths, so any torch version on any CPU produces the same
state dict. With these weights our model can be compared with the official implementation
without distributing trained checkpoints.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np
import torch

_MASK32 = np.uint64(0xFFFFFFFF)


def mix32(x: np.ndarray) -> np.ndarray:
    """The "lowbias32" integer hash, element-wise on uint32 values."""
    x = x.astype(np.uint64)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _MASK32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _MASK32
    x ^= x >> np.uint64(16)
    return x


def _uniforms(key: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    salt = mix32(np.array([zlib.crc32(key.encode("utf-8"))], dtype=np.uint64))[0]
    index = np.arange(count, dtype=np.uint64)
    streams = []
    for stream in (0, 1):
        hashed = mix32(mix32(np.uint64(2) * index + np.uint64(stream)) ^ salt)
        streams.append((hashed.astype(np.float64) + 0.5) / 2.0**32)
    return streams[0], streams[1]


def reference_tensor(key: str, shape: tuple[int, ...], dtype: str = "float32") -> torch.Tensor:
    """One tensor of the reference weights, by the rules of the reference README."""
    if dtype == "int64":
        return torch.zeros(shape, dtype=torch.int64)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    u, u1 = _uniforms(key, count)
    z = np.sqrt(-2.0 * np.log(u)) * np.cos(2.0 * np.pi * u1)
    if key.endswith("running_var"):
        values = 0.5 + u
    elif key.endswith("running_mean"):
        values = 0.1 * z
    elif "layer_scale" in key:
        values = 0.1 + 0.4 * u
    elif len(shape) == 1 and key.endswith(".weight"):
        values = 1.0 + 0.1 * z
    elif key.endswith(".bias"):
        values = 0.1 * z
    elif len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        gain = 0.5 if shape[1] == 1 else 1.0
        values = gain / np.sqrt(fan_in) * z
    else:
        raise ValueError(f"no reference-weight rule covers {key} with shape {shape}")
    return torch.from_numpy(values.astype(np.float32).reshape(shape))


def reference_state_dict(entries: Iterable[tuple[str, tuple[int, ...], str]]) -> dict:
    """Reference weights for ``(key, shape, dtype)`` entries, in the given order."""
    return {key: reference_tensor(key, tuple(shape), dtype) for key, shape, dtype in entries}


def manifest_of(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """The ``(key, shape, dtype)`` manifest of a model's state dict."""
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()]


def weights_fingerprint(state_dict: dict) -> tuple[float, float]:
    """``[sum of all values, sum_k (1 + k mod 7) * sum|entry k|]`` in float64, in dict order."""
    total = weighted = 0.0
    for k, tensor in enumerate(state_dict.values()):
        values = tensor.detach().cpu().double()
        if not tensor.is_floating_point():
            values = torch.zeros_like(values)
        total += float(values.sum())
        weighted += (1 + k % 7) * float(values.abs().sum())
    return total, weighted
