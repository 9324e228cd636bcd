"""OpenVINO IR export: FP32 / FP16 / NNCF INT8 through the parity-checked ONNX of the deploy
form, and the INT8 IR of a QAT model (``export_qat_openvino``).

Both go through ``write_checked_ir``: the IR carries the artifact metadata in
``rt_info/lrformer_edge``, is checked against its PyTorch model with an explicitly FP32 OpenVINO
runner, must compile under every inference-precision hint (f32, bf16, f16), and replaces the
output folder only when all of that passed.
"""
from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lrformer_edge.artifacts.metadata import artifact_metadata, decode_metadata
from lrformer_edge.artifacts.optional import require
from lrformer_edge.artifacts.parity import (
    INPUT_NAME,
    OUTPUT_NAME,
    QAT_EXPORT_PARITY,
    ParityThresholds,
    check_parity,
    parity_inputs,
    parity_thresholds,
)
from lrformer_edge.artifacts.precision_config import (
    METADATA_KEY,
    PrecisionConfig,
    checked_precision_config,
)
from lrformer_edge.artifacts.result import ArtifactCheckError, ExportResult
from lrformer_edge.artifacts.runner import RunnerStateError
from lrformer_edge.artifacts.staging import staged_directory
from lrformer_edge.backends.layer_names import float_layer_nodes
from lrformer_edge.backends.nncf_statistics import open_statistics_cache
from lrformer_edge.backends.onnxruntime.export import export_onnx
from lrformer_edge.backends.openvino.ir import IR_PRECISIONS, write_rt_metadata
from lrformer_edge.backends.openvino.ptq import (
    PRECISION_SCHEMES,
    check_statistics_cache_request,
    uses_statistics_cache,
)
from lrformer_edge.backends.openvino.runner import (
    PRECISIONS,
    OpenVINORunner,
    native_precisions,
)
from lrformer_edge.cpu import (
    DEFAULT_INT8_TARGET,
    host_cpu,
    int8_mismatch,
    resolve_int8_target,
)
from lrformer_edge.models.deploy import check_input_size, to_deploy
from lrformer_edge.progress import heartbeat, track
from lrformer_edge.registry import input_size_of


def export_openvino(model, output_dir: str | Path, input_size=None, precision: str = "fp32",
                    batch_size: int | None = 1, parity: ParityThresholds | None = None,
                    calibration=None, max_drop: float | None = None,
                    target_isa: str = DEFAULT_INT8_TARGET,
                    statistics_cache: str | Path | bool = True,
                    precision_config: PrecisionConfig | None = None,
                    smooth_quant: float | None = None) -> ExportResult:
    """Write ``output_dir/<variant>.xml/.bin``; returns the parity of the IR vs PyTorch.

    ``precision="int8"`` needs ``calibration`` (a ``CalibrationSet`` at this input size);
    ``max_drop`` (mIoU points against the FP32 model's own predictions) turns on NNCF's
    accuracy control, which keeps the most sensitive layers in float until the drop fits.
    ``target_isa`` is the x86 ISA the INT8 IR is made for (``lrformer_edge.cpu``): ``portable``
    (default) runs correctly on every x86 CPU; ``vnni``/``amx`` keep full 8-bit weights, which
    saturate on CPUs without VNNI. The parity check computes what the target computes: on a host
    without VNNI, an IR for VNNI targets is checked with exact int8 arithmetic (emulated).
    ``statistics_cache`` (int8): where calibration statistics are reused from and kept
    (``nncf_statistics.open_statistics_cache``; False: none).
    ``precision_config`` (int8): its float layers stay out of NNCF's quantization (ignored scope
    by friendly name, ``openvino/layer_names.py``); the IR records it and those names.
    ``smooth_quant`` (int8): SmoothQuant alpha of the convolutions (``openvino/ptq.py``); such
    an export opens no statistics cache (``ptq.uses_statistics_cache``).
    """
    ov = require("openvino", "openvino", "OpenVINO export")
    if precision not in IR_PRECISIONS:
        raise ValueError(f"precision must be one of {IR_PRECISIONS}, got {precision!r}")
    if precision == "int8" and calibration is None:
        raise ValueError("int8 needs a calibration set (build_calibration_set(...))")
    if precision != "int8" and (calibration is not None or max_drop is not None
                                or precision_config is not None):
        raise ValueError("calibration data, max_drop and a precision config apply to int8 only")
    if precision != "int8" and smooth_quant is not None:
        raise ValueError(f"SmoothQuant applies to int8 only, not to {precision}")
    check_statistics_cache_request(smooth_quant, statistics_cache)
    target_isa = resolve_int8_target(target_isa)
    input_size = check_input_size(input_size_of(model, input_size))
    precision_config = checked_precision_config(precision_config, model, input_size,
                                                PRECISION_SCHEMES, "OpenVINO INT8")
    cache = open_statistics_cache(model, input_size, calibration, statistics_cache) \
        if precision == "int8" and uses_statistics_cache(smooth_quant) else None

    def convert(scratch: Path):
        onnx_result = export_onnx(model, scratch / "model.onnx", input_size, batch_size)
        with heartbeat("OpenVINO conversion"):
            ov_model = ov.convert_model(str(onnx_result.path))
        quantization = {}
        if precision == "int8":
            from lrformer_edge.backends.openvino.layer_names import openvino_layer_nodes
            from lrformer_edge.backends.openvino.ptq import quantize_openvino

            float_nodes = float_layer_nodes(
                precision_config, lambda: openvino_layer_nodes(model, ov_model))
            ov_model, quantization = quantize_openvino(
                ov_model, model, calibration, max_drop, target_isa, cache,
                [name for names in float_nodes.values() for name in names], smooth_quant,
                onnx_result.path)
            if precision_config is not None:
                quantization = {**quantization, METADATA_KEY: precision_config.metadata(),
                                "float_layer_nodes": float_nodes}
        return ov_model, artifact_metadata(
            model, input_size, format="openvino-ir", weights_precision=precision,
            batch_size=batch_size or "dynamic", openvino_version=ov.__version__,
            onnx_parity=onnx_result.parity.as_dict(), **quantization)

    feed = calibration.batches[0] if precision == "int8" else \
        parity_inputs(input_size, batch_size or 1)
    return write_checked_ir(convert, output_dir, model.config.name, to_deploy(model, input_size),
                            feed, parity or parity_thresholds(precision),
                            compress_to_fp16=precision == "fp16")


def export_mixed_openvino(model, work_dir: str | Path, input_size,
                          precision_config: PrecisionConfig, calibration) -> ExportResult:
    """``Backend.export_mixed``: the INT8 IR of ``precision_config`` in ``work_dir/openvino-int8``
    (calibration statistics from the default cache, so repeated exports of one model are
    fast)."""
    return export_openvino(model, Path(work_dir) / "openvino-int8", input_size, "int8",
                           calibration=calibration, precision_config=precision_config)


def export_qat_openvino(quantized, payload: dict, output_dir: str | Path,
                        feed: np.ndarray) -> ExportResult:
    """INT8 IR of a QAT model, checked against the torch fake-quant model it came from.

    ``payload`` is its checkpoint as ``lrformer_edge.quant.qat.restore`` returns it, with the
    QAT settings under ``"quantization"``; ``feed`` a (1, 3, H, W) batch at its input size."""
    ov = require("openvino", "openvino", "OpenVINO export")
    quantized.eval()

    def convert(scratch: Path):
        example = torch.from_numpy(feed)
        with heartbeat("OpenVINO conversion of the QAT model"), torch.no_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about the fake-quant ops
            ov_model = ov.convert_model(_traced(_stripped(quantized, feed), example),
                                        input=[tuple(example.shape)])  # fixed, like the ONNX IRs
        ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})  # as in the ONNX-based IRs
        ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
        return ov_model, artifact_metadata(
            quantized, payload["input_size"], format="openvino-ir", weights_precision="int8",
            quantization=payload["quantization"], calibration_set=payload.get("calibration_set"),
            openvino_version=ov.__version__)

    return write_checked_ir(convert, output_dir, f"{payload['variant']}-qat", quantized, feed,
                            QAT_EXPORT_PARITY, reference_name="the QAT model")


def _stripped(quantized, feed: np.ndarray):
    """The fake-quant model with NNCF's hooks replaced by torch fake-quantize ops (what the
    OpenVINO converter understands)."""
    import logging

    nncf = require("nncf", "qat", "exporting a QAT model")
    require("torchao", "qat", "stripping a QAT model for export")
    logging.getLogger("torchao").setLevel(logging.ERROR)  # GPU-kernel chatter on CPU hosts
    return nncf.strip(quantized, do_copy=True, example_input=torch.from_numpy(feed))


def _traced(model: torch.nn.Module, example: torch.Tensor):
    """TorchScript of ``model`` for the converter, traced once: ``torch.jit.trace``'s own check
    traces the model a second time (half of a 2-minute conversion of LRFormer-T), and the
    parity check of the written IR compares its outputs with the model's anyway."""
    return torch.jit.trace(model, example, check_trace=False, strict=False)


def write_checked_ir(convert: Callable, output_dir: str | Path, name: str, reference,
                     feed: np.ndarray, parity: ParityThresholds,
                     compress_to_fp16: bool = False,
                     reference_name: str | None = None) -> ExportResult:
    """Write ``output_dir/<name>.xml/.bin`` only when it reproduces ``reference`` and compiles.

    ``convert(scratch_folder) -> (ov.Model, artifact metadata)`` makes the model (intermediate
    files go to the scratch folder); the IR gets the metadata, is compared with the PyTorch
    ``reference`` on ``feed`` within ``parity`` (``reference_name`` names it in the message
    where it is not the FP32 model), compiled under every precision hint, and then replaces
    ``output_dir``."""
    output_dir = Path(output_dir)
    start = time.time()
    with staged_directory(output_dir) as staging:
        xml = staging / f"{name}.xml"
        metadata = decode_metadata(_save_ir(convert, xml, compress_to_fp16))
        emulate = parity_emulates_exact_int8(metadata)
        label = xml.name + (f" vs {reference_name}" if reference_name else "") + \
            (" (exact int8 emulated)" if emulate else "")
        agreement = check_parity(reference, OpenVINORunner(xml, precision="f32",
                                                           emulate_exact_int8=emulate),
                                 feed, parity, label)
        # The parity check compiled and ran the plain f32 program (not when it emulated exact
        # int8: that is another program), finite outputs included.
        compiles_under_every_hint(xml, checked=() if emulate else ("f32",))
    return ExportResult(output_dir / xml.name, agreement, time.time() - start, {}, metadata)


def _save_ir(convert: Callable, xml: Path, compress_to_fp16: bool) -> dict:
    ov = require("openvino", "openvino", "OpenVINO export")
    with tempfile.TemporaryDirectory(prefix="lrformer-ov-") as scratch:
        ov_model, metadata = convert(Path(scratch))
        write_rt_metadata(ov_model, metadata)
        ov.save_model(ov_model, str(xml), compress_to_fp16=compress_to_fp16)
    return metadata


def parity_emulates_exact_int8(metadata: dict) -> bool:
    """Whether an IR's parity check runs with exact int8 arithmetic emulated.

    PyTorch (and the fake-quant model of QAT) compute int8 products exactly, as the CPUs an IR
    for VNNI/AMX targets is made for do; on a host whose int8 sums saturate, such an IR (or one
    recording no target: made with NNCF's default, full-range weights) is checked with what its
    target CPUs compute. A portable IR matches natively everywhere."""
    if metadata.get("weights_precision") != "int8":
        return False
    target = (metadata.get("quantization") or {}).get("target_cpu_isa")
    return int8_mismatch(target) is not None


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


def compiles_under_every_hint(xml: Path, checked: tuple[str, ...] = ()) -> None:
    """Compile and run once under each precision hint this CPU runs natively but ``checked``
    (hints already compiled and run, by the parity check): an IR that fails any is not shipped.
    A hint the CPU has no native support for (bf16, f16 on AVX2) compiles to the f32 program,
    which the f32 compile has already checked (``compile_check_line``)."""
    hints = [hint for hint in native_precisions() if hint not in checked]
    if not hints:
        return
    for hint in track(hints, what="precision hints", label=f"compiling {xml.name}"):
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


def precision_config_lines(metadata: dict) -> list[str]:
    """What an INT8 IR made from a precision config kept in float, for the export summary."""
    float_nodes = metadata.get("float_layer_nodes")
    if not float_nodes:
        return []
    return [f"precision config: {len(float_nodes)} layer(s) kept in float "
            f"({sum(map(len, float_nodes.values()))} operation(s) in NNCF's ignored scope)"]


def compile_check_line() -> str:
    """What the export's compile check covered on this CPU, for the export summary."""
    native = native_precisions()
    line = f"compiles under the {', '.join(native)} inference-precision hint" + \
        ("s" if len(native) > 1 else "")
    emulated = [hint for hint in PRECISIONS if hint not in native]
    if emulated:
        line += (f"; {' and '.join(emulated)} run as f32 on this CPU (no native support: the f32 "
                 f"compile covers them); check them on a CPU that has them")
    return line
