"""OpenVINO IRs (.xml + .bin) on x86 CPUs: FP32/FP16 weights, NNCF INT8, an explicit inference
precision hint."""
from __future__ import annotations

from lrformer_edge.backends.base import Backend, RuntimeOption, variant_checked
from lrformer_edge.backends.openvino import benchmark
from lrformer_edge.backends.openvino.describe import (
    PRECISION_KEYS,
    describe_ir,
    is_ir_folder,
)
from lrformer_edge.backends.openvino.ir import IR_PRECISIONS
from lrformer_edge.backends.openvino.ptq import PRECISION_SCHEMES, quantize_openvino
from lrformer_edge.backends.openvino.runner import (
    DEFAULT_PRECISION,
    PRECISIONS,
    OpenVINORunner,
)


def _export(*args, **kwargs):
    """``export_openvino``, imported on call: it needs PyTorch, the registry must not."""
    from lrformer_edge.backends.openvino.export import export_openvino

    return export_openvino(*args, **kwargs)


def _export_mixed(*args, **kwargs):
    """``export_mixed_openvino``, imported on call for the same reason."""
    from lrformer_edge.backends.openvino.export import export_mixed_openvino

    return export_mixed_openvino(*args, **kwargs)


def _export_qat(*args, **kwargs):
    """``export_qat_openvino``, imported on call for the same reason."""
    from lrformer_edge.backends.openvino.export import export_qat_openvino

    return export_qat_openvino(*args, **kwargs)


BACKEND = Backend(
    name="openvino", title="OpenVINO IR", suffixes=(".xml",), recognises=is_ir_folder,
    artifact_form=".xml, or the folder holding one",
    precisions=IR_PRECISIONS, precision_keys=PRECISION_KEYS, extra="openvino",
    runtime_options=(
        RuntimeOption("precision", PRECISIONS, DEFAULT_PRECISION,
                      "OpenVINO inference precision hint", flag="--openvino-precision"),
        RuntimeOption("emulate_exact_int8", (False, True), False,
                      "run OpenVINO INT8 IRs with exact int8 arithmetic emulated (slow): what a "
                      "CPU with VNNI or AMX computes, e.g. to gate an IR made with --cpu-isa vnni "
                      "on a CPU without VNNI", flag="--emulate-exact-int8"),
    ),
    open_runner=variant_checked(OpenVINORunner), describe=describe_ir,
    benchmark_candidates=benchmark.candidates,
    export=_export, quantize=quantize_openvino,
    export_qat=_export_qat, qat_artifact_name="openvino-int8",
    precision_schemes=PRECISION_SCHEMES, export_mixed=_export_mixed,
    exact_int8_accumulation=False,  # x86 CPUs without VNNI saturate 16-bit int8 sums
)
