"""Core ML packages (.mlpackage) for Apple devices: FP16/FP32 compute, int8, int4 or 4-bit
palettised weights (layer by layer from a precision config), W8A8. Predicts on macOS only;
inspected anywhere, and measured through a PyTorch proxy of its weights."""
from __future__ import annotations

from lrformer_edge.backends.base import Backend, variant_checked
from lrformer_edge.backends.coreml import benchmark
from lrformer_edge.backends.coreml.compression import compressed_weight_bytes, keeps_float
from lrformer_edge.backends.coreml.describe import PRECISION_KEYS, describe_package
from lrformer_edge.backends.coreml.export import (
    PRECISION_SCHEMES,
    PRECISIONS,
    export_coreml,
    export_mixed,
    proxy_model,
)
from lrformer_edge.backends.coreml.runner import CoreMLRunner, coreml_unavailable_reason


def _quantize(*args, **kwargs):
    """``quantize_w8a8``, imported on call: it needs PyTorch, the registry must not."""
    from lrformer_edge.backends.coreml.w8a8 import quantize_w8a8

    return quantize_w8a8(*args, **kwargs)


BACKEND = Backend(
    name="coreml", title="Core ML package", suffixes=(".mlpackage",),
    precisions=PRECISIONS, precision_keys=PRECISION_KEYS, extra="coreml",
    unavailable_reason=coreml_unavailable_reason,
    open_runner=variant_checked(CoreMLRunner), describe=describe_package,
    benchmark_candidates=benchmark.candidates,
    export=export_coreml, quantize=_quantize,
    precision_schemes=PRECISION_SCHEMES, export_mixed=export_mixed,
    weight_bytes=compressed_weight_bytes, keeps_float=keeps_float,
    proxy_model=lambda model, path, calibration=None: proxy_model(model, path,
                                                                  calibration=calibration),
)
