"""ExecuTorch programs (.pte) with the XNNPACK delegate: PyTorch's on-device runtime for Android,
iOS and ARM Linux CPUs, run here on x86 by the same XNNPACK kernels. FP32, and PT2E INT8 with
the XNNPACK quantizer."""
from __future__ import annotations

from lrformer_edge.backends.base import Backend, variant_checked
from lrformer_edge.backends.executorch import benchmark
from lrformer_edge.backends.executorch.describe import (
    describe_program,
    executorch_unavailable_reason,
)
from lrformer_edge.backends.executorch.format import (
    EXTRA,
    PRECISION_SCHEMES,
    PRECISIONS,
    PTE_SUFFIX,
)
from lrformer_edge.backends.executorch.runner import ExecuTorchRunner


def _export(*args, **kwargs):
    """``export_executorch``, imported on call: it needs PyTorch, the registry must not."""
    from lrformer_edge.backends.executorch.export import export_executorch

    return export_executorch(*args, **kwargs)


def _export_mixed(*args, **kwargs):
    """``export_mixed_executorch``, imported on call for the same reason."""
    from lrformer_edge.backends.executorch.export import export_mixed_executorch

    return export_mixed_executorch(*args, **kwargs)


def _export_qat(*args, **kwargs):
    """``export_qat_executorch``, imported on call for the same reason."""
    from lrformer_edge.backends.executorch.qat import export_qat_executorch

    return export_qat_executorch(*args, **kwargs)


def _quantizer_rules(nncf) -> dict:
    from lrformer_edge.backends.executorch.qat import quantizer_rules

    return quantizer_rules(nncf)


BACKEND = Backend(
    name="executorch", title="ExecuTorch program", suffixes=(PTE_SUFFIX,),
    precisions=PRECISIONS, precision_keys=PRECISIONS, extra=EXTRA,
    unavailable_reason=executorch_unavailable_reason,
    open_runner=variant_checked(ExecuTorchRunner), describe=describe_program,
    benchmark_candidates=benchmark.candidates, export=_export,
    export_qat=_export_qat, qat_artifact_name="lrformer-qat-int8.pte",
    quantizer_rules=_quantizer_rules,
    precision_schemes=PRECISION_SCHEMES, export_mixed=_export_mixed,
    exact_int8_accumulation=True,  # XNNPACK's int8 kernels sum in 32 bits on ARM and x86
)
