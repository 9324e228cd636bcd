"""Reading checkpoints (official mmseg releases, our own, plain state dicts, safetensors).

A checkpoint is untrusted input: pickles are read with ``weights_only=True`` so no arbitrary
object can be constructed, and every mismatch is reported in one readable error.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from lrformer_edge.files import CHECKPOINT_SUFFIXES, atomic_write

_SHOW = 8


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from any known container, keys normalised."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    kind = checkpoint_format(path)
    if kind is None:  # torch.load would advise weights_only=False: wrong for a non-checkpoint
        raise CheckpointError(
            f"{path} is not a checkpoint: neither a PyTorch file (torch.save's zip or pickle) "
            f"nor a safetensors file; expected one of those ({', '.join(CHECKPOINT_SUFFIXES)})")
    raw = _read_safetensors(path) if kind == "safetensors" else _read_pickle(path)
    state_dict = normalise_state_dict(raw, source=str(path))
    check_finite(state_dict, source=str(path))
    return state_dict


def checkpoint_format(path: str | os.PathLike) -> str | None:
    """What the first bytes say the file is: "zip" (torch.save), "pickle" (torch.save's legacy
    format), "safetensors", or None (not a checkpoint at all)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"  # the PROTO opcode every pickle of protocol 2+ starts with
    header_size = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if head[8:9] == b"{" and 0 < header_size < os.path.getsize(path):
        return "safetensors"  # 8-byte little-endian header size, then the JSON header
    return None


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Refuse NaN/Inf weights: the model would output NaN, which no later check can judge."""
    bad = {}
    for key, value in state_dict.items():
        if value.is_floating_point():
            count = int((~torch.isfinite(value)).sum())
            if count:
                bad[key] = count
    if bad:
        key, count = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"checkpoint {source}: tensor {key!r} has {count} non-finite values (NaN/Inf){more}; "
            f"the training that wrote it diverged or the file is damaged: use another checkpoint")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types here; all mean "not loadable"
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {message}. Only tensors, numbers, strings and "
            f"containers of them are accepted (torch.load(weights_only=True)); a checkpoint "
            f"holding arbitrary Python objects must be converted by whoever trusts it."
        ) from None


def normalise_state_dict(raw: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap ``{'state_dict': ...}`` / ``{'model': ...}`` and strip ``module.`` prefixes."""
    if isinstance(raw, Mapping):
        for container in ("state_dict", "model", "model_state_dict"):
            if container in raw and isinstance(raw[container], Mapping):
                raw = raw[container]
                break
    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointError(f"{source} holds no state dict (got {type(raw).__name__})")
    tensors = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith("module."):
            key = key[len("module."):]
        tensors[key] = value
    if not tensors:
        raise CheckpointError(f"{source} holds no tensors")
    return tensors


def checkpoint_variant(path: str | os.PathLike) -> str | None:
    """The registry variant a checkpoint records (our training/bundled files do), if any."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                return (handle.metadata() or {}).get("variant")
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable files are reported by read_state_dict, with context
        return None
    meta = payload.get("meta") if isinstance(payload, Mapping) else None
    return meta.get("variant") if isinstance(meta, Mapping) else None


def num_classes_in(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    weight = state_dict.get("decode_head.conv_seg.weight")
    return None if weight is None else int(weight.shape[0])


def check_compatible(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                     source: str = "checkpoint") -> None:
    """Raise one error listing missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not match the model ({type(model).__name__}):"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            lines.append(f"  {len(items)} {title}: {', '.join(items[:_SHOW])}{more}")
    if unexpected and all(k.startswith(("backbone.", "decode_head.")) for k in unexpected[:_SHOW]):
        lines.append("  hint: is the variant right? (lrformer_edge.list_models())")
    elif unexpected and not any(k.startswith(("backbone.", "decode_head.")) for k in state_dict):
        lines.append("  hint: keys should start with 'backbone.' or 'decode_head.' "
                     "(mmseg EncoderDecoder layout)")
    raise CheckpointError("\n".join(lines))


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
              strict: bool = True, source: str = "checkpoint") -> None:
    if strict:
        check_compatible(model, state_dict, source)
    expected = model.state_dict()
    usable = {k: v for k, v in state_dict.items()
              if k in expected and v.shape == expected[k].shape}
    # Half-precision checkpoints (like the bundled model) are widened to the model's dtype.
    usable = {k: v.to(expected[k].dtype) for k, v in usable.items()}
    model.load_state_dict(usable, strict=strict)


def save_mmseg_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                          meta: Mapping | None = None, **extra) -> Path:
    """Write ``{'meta': ..., 'state_dict': ...}`` (official layout) atomically."""
    payload = {"meta": dict(meta or {}), "state_dict": dict(state_dict), **extra}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))
