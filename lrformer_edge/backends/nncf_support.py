"""What the NNCF-based quantizers of several backends share (OpenVINO PTQ, TensorRT Q/DQ, QAT)."""
from __future__ import annotations

from lrformer_edge.cpu import (
    host_cpu,
    int8_needs_exact_accumulation,
)

FLOAT_POOLING = "adaptive-pooling MatMuls (constant averaging matrix on the left)"


def overflow_fix(nncf, target_isa: str):
    """NNCF's overflow handling for an INT8 model made for ``target_isa``."""
    exact = int8_needs_exact_accumulation(target_isa)
    return nncf.OverflowFix.DISABLE if exact else nncf.OverflowFix.ENABLE


def target_isa_settings(target_isa: str) -> dict:
    """What an INT8 artifact records of its target CPU (read back by the runners)."""
    exact = int8_needs_exact_accumulation(target_isa)
    return {"target_cpu_isa": target_isa, "weight_bits": 8 if exact else 7,
            "overflow_fix": "disable" if exact else "enable",
            "needs_vnni": exact, "exported_on": host_cpu().describe()}
