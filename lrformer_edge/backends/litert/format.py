"""The ``.tflite`` file: checking and loading it with errors that say what is wrong, and the
artifact metadata it carries.

The metadata lives IN the model, not in a sidecar: the TFLite flatbuffer has a ``metadata``
table of named buffers (where TFLite Support keeps its own), and an LRFormer Edge export adds
one, ``lrformer_metadata``, holding the JSON of ``artifact_metadata`` (the same flat keys as
every other artifact). A copied ``.tflite`` can never lose it, and LiteRT ignores names it does
not know.
"""
from __future__ import annotations

import json
import logging
import struct
from collections.abc import Mapping
from pathlib import Path

from lrformer_edge.artifacts.metadata import decode_metadata
from lrformer_edge.artifacts.optional import require

EXTRA = "litert"  # the pyproject extra that installs litert-torch, ai-edge-litert, the quantizer
INSTALL = f"pip install 'lrformer-edge[{EXTRA}]'"
TFLITE_SUFFIX = ".tflite"
# FP32; FP16 weights (dequantised on CPUs, native on GPU delegates); static INT8 weights and
# activations with float input and output.
PRECISIONS = ("fp32", "fp16", "int8")
# The precision configs INT8 applies: its float layers' operators stay float (``layer_ops.py``).
PRECISION_SCHEMES = ("int8",)
METADATA_NAME = "lrformer_metadata"
EXPORT_HINT = "export it with export_scripts/to_litert.py"
# A .tflite starts with a 4-byte flatbuffer root offset, then the file identifier "TFL3".
_IDENTIFIER = slice(4, 8)
_TFLITE_IDENTIFIER = b"TFL3"


def litert_module(module: str, what: str):
    """Import a LiteRT module, or raise the error naming the ``litert`` extra."""
    # absl (used by the converter and the quantizer) warns once per process before its flags
    # are parsed; the messages are noise for a command-line user.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return require(module, EXTRA, what)


def _schema():
    return litert_module("ai_edge_litert.schema_py_generated", "reading a .tflite")


# ----------------------------------------------------------------------------- metadata
def with_metadata(model: bytes, metadata: Mapping[str, str]) -> bytes:
    """``model`` (a serialised TFLite flatbuffer) with ``metadata`` added as the
    ``lrformer_metadata`` buffer (replacing one already there)."""
    import numpy as np

    utils = litert_module("ai_edge_litert.tools.flatbuffer_utils", "writing a .tflite")
    schema = _schema()
    tree = utils.read_model_from_bytearray(bytearray(model))
    for buffer in tree.buffers:
        # Buffers the quantizer stored after the flatbuffer (offset and size) come back as
        # bytearray slices, which the flatbuffer builder packs one byte per call (30 s for an
        # FP16 LRFormer-T); as numpy arrays they are packed in one copy.
        if buffer.data is not None and not isinstance(buffer.data, np.ndarray):
            buffer.data = np.frombuffer(bytes(buffer.data), np.uint8)
    tree.metadata = [entry for entry in (tree.metadata or [])
                     if _entry_name(entry.name) != METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(dict(metadata), sort_keys=True).encode(), np.uint8)
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(tree.buffers) - 1
    tree.metadata.append(entry)
    return bytes(utils.convert_object_to_bytearray(tree))


def _entry_name(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def metadata_of(model: bytes, path: str | Path) -> dict:
    """The metadata a serialised ``model`` carries (``path`` names it in errors)."""
    name = Path(path).name
    try:
        root = _schema().Model.GetRootAs(model, 0)
        entries = {_entry_name(root.Metadata(i).Name()): root.Metadata(i).Buffer()
                   for i in range(root.MetadataLength())}
        index = entries.get(METADATA_NAME)
        raw = None if index is None else root.Buffers(index).DataAsNumpy()
    except (IndexError, ValueError, TypeError, UnicodeDecodeError, struct.error) as error:
        raise damaged(name, error) from None
    if index is None:
        raise ValueError(f"{name} is not an LRFormer Edge LiteRT model: it has no "
                         f"{METADATA_NAME} metadata (it has {sorted(entries) or 'none'}); "
                         f"{EXPORT_HINT}")
    try:
        props = json.loads(bytes(raw)) if not isinstance(raw, int) else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        props = None
    if not isinstance(props, dict):
        raise ValueError(f"{name}: its {METADATA_NAME} buffer does not hold LRFormer Edge "
                         f"metadata (not a JSON object); {EXPORT_HINT}")
    return decode_metadata(props)


def damaged(name: str, error: Exception) -> ValueError:
    """The error for a model whose flatbuffer cannot be parsed (``error``: the parser's, e.g.
    struct.error for a truncated file whose tables point past its end)."""
    return ValueError(f"{name} is damaged: its flatbuffer tables cannot be read ({error}); "
                      f"{EXPORT_HINT}")


def read_tflite_metadata(path: str | Path) -> dict:
    """The metadata an LRFormer Edge ``.tflite`` carries (decoded, prefix stripped)."""
    return metadata_of(read_tflite(path), path)


# ----------------------------------------------------------------------------- the file
def check_tflite_file(path: str | Path) -> Path:
    """An existing file that starts like a TFLite model: a foreign file is a ValueError saying
    so, before LiteRT's own errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"expected a LiteRT model (.tflite file), got {path}"
                         + ("" if path.exists() else " (it does not exist)"))
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[_IDENTIFIER] != _TFLITE_IDENTIFIER:
        raise ValueError(f"{path.name} is not a LiteRT model (it does not carry the TFLite file "
                         f"identifier {_TFLITE_IDENTIFIER.decode()}); {EXPORT_HINT}")
    return path


def read_tflite(path: str | Path) -> bytes:
    return check_tflite_file(path).read_bytes()
