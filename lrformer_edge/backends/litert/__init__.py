"""LiteRT models (.tflite), formerly TensorFlow Lite: the runtime most Android apps ship, with
GPU and NPU delegates and XNNPACK on ARM CPUs, run here on x86 by the same XNNPACK kernels.
FP32, FP16 weights, and static INT8 (ai-edge-quantizer) with float input and output."""
from __future__ import annotations

from lrformer_edge.backends.base import Backend, variant_checked
from lrformer_edge.backends.litert import benchmark
from lrformer_edge.backends.litert.describe import describe_model, litert_unavailable_reason
from lrformer_edge.backends.litert.format import (
    EXTRA,
    PRECISION_SCHEMES,
    PRECISIONS,
    TFLITE_SUFFIX,
)
from lrformer_edge.backends.litert.runner import LiteRTRunner


def _export(*args, **kwargs):
    """``export_litert``, imported on call: it needs PyTorch, the registry must not."""
    from lrformer_edge.backends.litert.export import export_litert

    return export_litert(*args, **kwargs)


def _export_mixed(*args, **kwargs):
    """``export_mixed_litert``, imported on call for the same reason."""
    from lrformer_edge.backends.litert.export import export_mixed_litert

    return export_mixed_litert(*args, **kwargs)


BACKEND = Backend(
    name="litert", title="LiteRT model", suffixes=(TFLITE_SUFFIX,),
    precisions=PRECISIONS, precision_keys=PRECISIONS, extra=EXTRA,
    unavailable_reason=litert_unavailable_reason,
    open_runner=variant_checked(LiteRTRunner), describe=describe_model,
    benchmark_candidates=benchmark.candidates, export=_export,
    precision_schemes=PRECISION_SCHEMES, export_mixed=_export_mixed,
    exact_int8_accumulation=True,  # XNNPACK's int8 kernels sum in 32 bits on ARM and x86
)
