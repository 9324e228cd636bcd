"""Which ONNX operators TensorRT 10.x's parser accepts (onnx-tensorrt support matrix)."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

SUPPORT_MATRIX = Path(__file__).resolve().parent / "data" / "tensorrt10_onnx_ops.md"


@lru_cache(maxsize=4)
def tensorrt_supported_ops(matrix: str | Path = SUPPORT_MATRIX) -> frozenset[str]:
    """Operator names from the markdown table (``| Op | Types | Restrictions |`` rows)."""
    ops = set()
    for line in Path(matrix).read_text().splitlines():
        match = re.match(r"^\|\s*([A-Z][A-Za-z0-9]*)\s*\|", line)
        if match and match.group(1) != "Operator":
            ops.add(match.group(1))
    return frozenset(ops)


def unsupported_ops(graph, matrix: str | Path = SUPPORT_MATRIX) -> dict[str, int]:
    """Operators of an ONNX model (default domain) that TensorRT 10.x would reject, with counts."""
    allowed = tensorrt_supported_ops(matrix)
    rejected: dict[str, int] = {}
    for node in graph.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in allowed:
            name = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            rejected[name] = rejected.get(name, 0) + 1
    return rejected
