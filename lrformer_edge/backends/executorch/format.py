"""The ``.pte`` file: loading a program with errors that say what is wrong, and the artifact
metadata it carries.

The metadata lives IN the program, not in a sidecar: a constant method ``lrformer_metadata``
returns the JSON of ``artifact_metadata`` (the same flat keys as every other artifact) as a
uint8 tensor, so a copied ``.pte`` can never lose it. Part of it (the lowering's stage timings
and op counts) exists only after lowering, while constant methods must be given before it; so
the program is lowered with the metadata known up front plus spare room (``reserve_metadata``),
and the final JSON overwrites that constant in the serialised program (``fill_metadata``). JSON
ignores the trailing spaces.
"""
from __future__ import annotations

import json
import logging
import struct
from collections.abc import Mapping
from pathlib import Path

from lrformer_edge.artifacts.metadata import decode_metadata
from lrformer_edge.artifacts.optional import require
from lrformer_edge.backends.executorch.delegation import DelegationReport

EXTRA = "executorch"  # the pyproject extra that installs ExecuTorch (and torchao)
INSTALL = f"pip install 'lrformer-edge[{EXTRA}]'"
METADATA_METHOD = "lrformer_metadata"
PTE_SUFFIX = ".pte"
PRECISIONS = ("fp32", "int8")  # FP32, and PT2E INT8 (XNNPACK quantizer)
# The precision configs INT8 applies: its float layers stay out of PT2E quantization.
PRECISION_SCHEMES = ("int8",)
FORWARD_METHOD = "forward"
EXPORT_HINT = "export it with export_scripts/to_executorch.py"
# Metadata keys the export adds beyond every artifact's: what lowering measured.
STAGE_SECONDS_KEY = "export_stage_seconds"
XNNPACK_OPS_KEY = "xnnpack_ops"  # operator -> count inside XNNPACK delegates
PORTABLE_OPS_KEY = "portable_ops"  # operator -> count left to ExecuTorch's portable kernels
DELEGATION_KEY = "delegation"  # the latency share inside XNNPACK, profiled at export (ETDump)
# Room for what lowering adds to the metadata (stage timings, op counts, PT2E settings):
# measured at 0.9 KiB for an INT8 program of the tiny variant (LRFormer's operator set).
METADATA_ROOM = 16384
# A .pte starts with a 4-byte flatbuffer root offset and the file identifier "ET" + 2 digits,
# then an extended header "eh00" recording the sizes of its parts (optional in the format).
_IDENTIFIER = slice(4, 8)
_EXTENDED_HEADER = struct.Struct("<4sIQQQ")  # magic, length, program, segment base, segment data
_EXTENDED_HEADER_OFFSET = 8


def executorch_module(module: str = "executorch.runtime", what: str = "the ExecuTorch runner"):
    """Import an ExecuTorch module, or raise the error naming the ``executorch`` extra."""
    # torchao, imported by ExecuTorch, logs a warning per GPU kernel library it cannot load.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    return require(module, EXTRA, what)


# ----------------------------------------------------------------------------- metadata
def encode_metadata(metadata: Mapping[str, str], size: int | None = None) -> bytes:
    """``artifact_metadata``'s dict as JSON bytes, padded with spaces to ``size`` if given."""
    text = json.dumps(dict(metadata), sort_keys=True).encode()
    if size is None:
        return text
    if len(text) > size:
        raise RuntimeError(f"the .pte metadata needs {len(text)} bytes, {size} were reserved "
                           f"(raise METADATA_ROOM)")
    return text + b" " * (size - len(text))


def reserve_metadata(metadata: Mapping[str, str]) -> bytes:
    """The metadata known before lowering, with room for what lowering adds."""
    return encode_metadata(metadata, len(encode_metadata(metadata)) + METADATA_ROOM)


def metadata_methods(encoded: bytes) -> dict:
    """The ``constant_methods`` of a program carrying ``encoded`` metadata."""
    import torch

    return {METADATA_METHOD: torch.frombuffer(bytearray(encoded), dtype=torch.uint8).clone()}


def fill_metadata(program: bytes, reserved: bytes, metadata: Mapping[str, str]) -> bytes:
    """``program`` with its ``reserved`` metadata constant replaced by ``metadata``."""
    found = program.count(reserved)
    if found != 1:  # the constant is stored verbatim; anything else is a serialisation change
        raise RuntimeError(f"the reserved metadata occurs {found} times in the serialised "
                           f"program, expected once")
    return program.replace(reserved, encode_metadata(metadata, len(reserved)))


def read_pte_metadata(path: str | Path) -> dict:
    """The metadata an LRFormer Edge ``.pte`` carries (decoded, prefix stripped)."""
    return metadata_of(load_program(path), path)


def metadata_of(program, path: str | Path) -> dict:
    """The metadata of an already loaded ``program`` (``path`` names it in errors)."""
    name = Path(path).name
    if METADATA_METHOD not in program.method_names:
        raise ValueError(f"{name} is not an LRFormer Edge ExecuTorch program: it has no "
                         f"{METADATA_METHOD} method (it has {sorted(program.method_names)}); "
                         f"{EXPORT_HINT}")
    try:
        raw = program.load_method(METADATA_METHOD).execute([])[0].numpy().tobytes()
        props = json.loads(raw)
    except RuntimeError as error:  # ExecuTorch's error code for damaged method data
        raise ValueError(f"{name} is damaged: its {METADATA_METHOD} method cannot be run "
                         f"({error}); {EXPORT_HINT}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        props = None
    if not isinstance(props, dict):
        raise ValueError(f"{name}: its {METADATA_METHOD} method does not hold LRFormer Edge "
                         f"metadata (not a JSON object); {EXPORT_HINT}")
    return decode_metadata(props)


def delegation_summary(metadata: Mapping) -> dict:
    """How many operators run inside XNNPACK and which stay outside it (by name and count), as
    the export counted them; empty for a program that records no counts."""
    inside, outside = metadata.get(XNNPACK_OPS_KEY), metadata.get(PORTABLE_OPS_KEY)
    if inside is None or outside is None:
        return {}
    summary = {"ops_in_xnnpack": sum(inside.values()),
               "ops_outside_xnnpack": sum(outside.values()),
               "outside_xnnpack": dict(sorted(outside.items(),
                                              key=lambda item: (-item[1], item[0])))}
    profiled = metadata.get(DELEGATION_KEY) or {}
    if "xnnpack_share" in profiled:
        summary["latency_share_in_xnnpack"] = profiled["xnnpack_share"]
        summary["latency_outside_xnnpack_ms"] = profiled.get("portable_ms", {})
    return summary


def export_report(metadata: Mapping) -> list[str]:
    """Lines saying how long each export stage took and what XNNPACK took over."""
    lines = []
    stages = metadata.get(STAGE_SECONDS_KEY) or {}
    if stages:
        lines.append("export stages: " + ", ".join(f"{stage} {seconds:.1f} s"
                                                  for stage, seconds in stages.items()))
    summary = delegation_summary(metadata)
    if summary:
        total = summary["ops_in_xnnpack"] + summary["ops_outside_xnnpack"]
        outside = ", ".join(f"{op} x{count}" for op, count in summary["outside_xnnpack"].items())
        lines.append(f"operators: {summary['ops_in_xnnpack']} of {total} inside XNNPACK, "
                     f"{summary['ops_outside_xnnpack']} on portable kernels"
                     + (f" ({outside})" if outside else ""))
    profiled = metadata.get(DELEGATION_KEY) or {}
    if "xnnpack_share" in profiled:
        lines.append(DelegationReport.from_dict(profiled).summary())
    return lines


# ----------------------------------------------------------------------------- the file
def check_pte_file(path: str | Path) -> Path:
    """An existing file that starts like an ExecuTorch program and is as long as its header
    says: a truncated or foreign file is a ValueError saying which, before ExecuTorch's own
    error codes."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"expected an ExecuTorch program (.pte file), got {path}"
                         + ("" if path.exists() else " (it does not exist)"))
    with open(path, "rb") as handle:
        head = handle.read(_EXTENDED_HEADER_OFFSET + _EXTENDED_HEADER.size)
    identifier = head[_IDENTIFIER]
    if len(identifier) < 4 or identifier[:2] != b"ET" or not identifier[2:].isdigit():
        raise ValueError(f"{path.name} is not an ExecuTorch program (it does not carry the "
                         f"ExecuTorch file identifier); {EXPORT_HINT}")
    expected = _expected_size(head)
    actual = path.stat().st_size
    if expected is not None and actual < expected:
        raise ValueError(f"{path.name} is truncated: its header says {expected} bytes, the file "
                         f"has {actual}; copy it again or {EXPORT_HINT}")
    return path


def _expected_size(head: bytes) -> int | None:
    """The file size an extended header records (None: no extended header)."""
    header = head[_EXTENDED_HEADER_OFFSET:]
    if len(header) < _EXTENDED_HEADER.size:
        return None
    magic, _, program_size, segment_base, segment_size = _EXTENDED_HEADER.unpack(header)
    if magic != b"eh00":
        return None
    return segment_base + segment_size if segment_base else program_size


def load_program(path: str | Path):
    """``executorch.runtime.Program`` of the ``.pte`` at ``path``, checked first."""
    path = check_pte_file(path)
    runtime = executorch_module().Runtime.get()
    try:
        return runtime.load_program(path)
    except RuntimeError as error:  # ExecuTorch reports a damaged file as an error code
        raise ValueError(f"{path.name} is not a readable ExecuTorch program ({error}): damaged, "
                         f"or made by an ExecuTorch this one cannot read; {EXPORT_HINT}") from None
