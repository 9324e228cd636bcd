"""TODO docstring."""
from __future__ import annotations

from lrformer_edge.cpu import (
    int8_needs_exact_accumulation,
)

FLOAT_POOLING = "adaptive-pooling MatMuls (constant averaging matrix on the left)"


def overflow_fix(nncf, target_isa: str):
    """NNCF's overflow handling for an INT8 model made for ``target_isa``."""
    exact = int8_needs_exact_accumulation(target_isa)
    return nncf.OverflowFix.DISABLE if exact else nncf.OverflowFix.ENABLE


