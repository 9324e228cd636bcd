"""Reading ONNX files: embedded metadata and operator histograms."""
from __future__ import annotations

from pathlib import Path

from lrformer_edge.artifacts.metadata import decode_metadata


def op_histogram(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def read_onnx_metadata(path: str | Path) -> dict:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except DecodeError as error:  # truncated, damaged or not an ONNX file at all
        raise ValueError(f"{path} is not a readable ONNX model: {error}") from None
    return decode_metadata({p.key: p.value for p in graph.metadata_props})


