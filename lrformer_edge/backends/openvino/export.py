"""OpenVINO IR export (FP32 / FP16 weights) through the parity-checked ONNX of the deploy form.

The IR carries the artifact metadata in ``rt_info/lrformer_edge``, is checked against the PyTorch
model with an explicitly FP32 OpenVINO runner, must compile under every inference-precision hint
(f32, bf16, f16), and replaces the output folder only when all of that passed.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.metadata import artifact_metadata, decode_metadata
from lrformer_edge.artifacts.optional import require
from lrformer_edge.artifacts.parity import (
    OUTPUT_NAME,
    ParityThresholds,
    check_parity,
    parity_inputs,
    parity_thresholds,
)
from lrformer_edge.artifacts.result import ArtifactCheckError, ExportResult
from lrformer_edge.artifacts.runner import RunnerStateError
from lrformer_edge.artifacts.staging import staged_directory
from lrformer_edge.backends.onnxruntime.export import export_onnx
from lrformer_edge.backends.openvino.ir import IR_PRECISIONS, write_rt_metadata
from lrformer_edge.backends.openvino.runner import PRECISIONS, OpenVINORunner
from lrformer_edge.cpu import (
    DEFAULT_INT8_TARGET,
    host_cpu,
    int8_mismatch,
    resolve_int8_target,
)
from lrformer_edge.models.deploy import check_input_size, to_deploy


def export_openvino(model, output_dir: str | Path, input_size=None, precision: str = "fp32",
                    batch_size: int | None = 1, parity: ParityThresholds | None = None,
                    calibration=None, max_drop: float | None = None,
                    target_isa: str = DEFAULT_INT8_TARGET) -> ExportResult:
    """Write ``output_dir/<variant>.xml/.bin``; returns the parity of the IR vs PyTorch.

    ``precision="int8"`` needs ``calibration`` (a ``CalibrationSet`` at this input size);
    ``max_drop`` (mIoU points against the FP32 model's own predictions) turns on NNCF's
    accuracy control, which keeps the most sensitive layers in float until the drop fits.
    ``target_isa`` is the x86 ISA the INT8 IR is made for (``lrformer_edge.cpu``): ``portable``
    (default) runs correctly on every x86 CPU; ``vnni``/``amx`` keep full 8-bit weights, which
    saturate on CPUs without VNNI. The parity check computes what the target computes: on a host
    without VNNI, an IR for VNNI targets is checked with exact int8 arithmetic (emulated).
    """
    ov = require("openvino", "openvino", "OpenVINO export")
    if precision not in IR_PRECISIONS:
        raise ValueError(f"precision must be one of {IR_PRECISIONS}, got {precision!r}")
    if precision == "int8" and calibration is None:
        raise ValueError("int8 needs a calibration set (build_calibration_set(...))")
    if precision != "int8" and (calibration is not None or max_drop is not None):
        raise ValueError("calibration data and max_drop apply to int8 only")
    target_isa = resolve_int8_target(target_isa)
    input_size = check_input_size(input_size or model.config.data.native_size)
    parity = parity or parity_thresholds(precision)
    output_dir = Path(output_dir)
    start = time.time()
    with staged_directory(output_dir) as staging:
        onnx_result = export_onnx(model, staging / "model.onnx", input_size, batch_size)
        ov_model = ov.convert_model(str(onnx_result.path))
        quantization = {}
        if precision == "int8":
            from lrformer_edge.backends.openvino.ptq import quantize_openvino

            ov_model, quantization = quantize_openvino(ov_model, model, calibration, max_drop,
                                                       target_isa)
        metadata = artifact_metadata(
            model, input_size, format="openvino-ir", weights_precision=precision,
            batch_size=batch_size or "dynamic", openvino_version=ov.__version__,
            onnx_parity=onnx_result.parity.as_dict(), **quantization)
        write_rt_metadata(ov_model, metadata)
        xml = staging / f"{model.config.name}.xml"
        ov.save_model(ov_model, str(xml), compress_to_fp16=precision == "fp16")
        (staging / "model.onnx").unlink()
        feed = calibration.batches[0] if precision == "int8" else \
            parity_inputs(input_size, batch_size or 1)
        emulate = precision == "int8" and int8_mismatch(target_isa) is not None
        agreement = check_parity(to_deploy(model, input_size),
                                 OpenVINORunner(xml, precision="f32", emulate_exact_int8=emulate),
                                 feed, parity, xml.name + (" (exact int8 emulated)" if emulate else ""))
        compiles_under_every_hint(xml)
    return ExportResult(output_dir / xml.name, agreement, time.time() - start, {},
                        decode_metadata(metadata))


def target_cpu_line(metadata: dict) -> str:
    """What an exported IR assumes of the CPU, for the export summary."""
    quantization = metadata.get("quantization") or {}
    if metadata.get("weights_precision") != "int8" or "target_cpu_isa" not in quantization:
        return f"float IR: runs on any CPU (this one: {host_cpu().describe()})"
    target = quantization["target_cpu_isa"]
    if quantization.get("needs_vnni"):
        line = (f"INT8 target CPUs: {target} ({quantization['weight_bits']}-bit weights; needs "
                f"VNNI or AMX, saturates on CPUs without them)")
    else:
        line = (f"INT8 target CPUs: {target} ({quantization['weight_bits']}-bit weights; correct "
                f"on every x86 CPU)")
    mismatch = int8_mismatch(target)
    return line + (f"\nthis CPU has no VNNI: parity was checked with exact int8 arithmetic "
                   f"emulated; {mismatch}" if mismatch else "")


def compiles_under_every_hint(xml: Path) -> None:
    """Compile and run once under each precision hint: an IR that fails any is not shipped."""
    for hint in PRECISIONS:
        try:
            with warnings.catch_warnings(), OpenVINORunner(xml, precision=hint) as runner:
                warnings.simplefilter("ignore", RuntimeWarning)  # ISA notes: the export says them
                spec = runner.input_specs[0]
                shape = tuple(1 if d is None else d for d in spec.shape)
                output = runner.infer({spec.name: np.zeros(shape, np.float32)})[OUTPUT_NAME]
        except RunnerStateError as error:
            raise ArtifactCheckError(f"{xml.name} does not compile at precision {hint}: "
                                     f"{error}") from None
        if not np.isfinite(output).all():
            raise ArtifactCheckError(f"{xml.name} gives non-finite outputs at precision {hint}")
