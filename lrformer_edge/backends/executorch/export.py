"""ExecuTorch export: the deploy form lowered to a ``.pte`` with the XNNPACK delegate, FP32 or
PT2E INT8 (``lowering.lower_to_executorch``), carrying the artifact metadata (``format``), checked
against PyTorch in ExecuTorch's runtime before it is written.

The program is written to a temporary file beside ``output``, run by ``ExecuTorchRunner`` and
compared with the deploy form on the parity feed (INT8: one calibration image, with the INT8
bounds), and renamed into place only when that passed: never a half-written or unchecked file.
"""
from __future__ import annotations

import importlib.metadata
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from lrformer_edge.artifacts.metadata import artifact_metadata, decode_metadata
from lrformer_edge.artifacts.parity import (
    ParityThresholds,
    check_parity,
    parity_inputs,
    parity_thresholds,
)
from lrformer_edge.artifacts.precision_config import (
    METADATA_KEY,
    PrecisionConfig,
)
from lrformer_edge.artifacts.requests import (
    check_calibration_request,
    check_int8_precision_config,
    check_output_suffix,
)
from lrformer_edge.artifacts.result import ExportResult
from lrformer_edge.backends.executorch.delegation import measure_delegation
from lrformer_edge.backends.executorch.format import (
    DELEGATION_KEY,
    PORTABLE_OPS_KEY,
    PRECISION_SCHEMES,
    PRECISIONS,
    PTE_SUFFIX,
    STAGE_SECONDS_KEY,
    XNNPACK_OPS_KEY,
    executorch_module,
    export_report,
    fill_metadata,
    metadata_methods,
    reserve_metadata,
)
from lrformer_edge.backends.executorch.runner import ExecuTorchRunner
from lrformer_edge.files import atomic_write
from lrformer_edge.registry import input_size_of

FORMAT = "executorch-pte"
DELEGATE = "XNNPACK"


def check_output_path(path: str | Path) -> Path:
    return check_output_suffix(path, PTE_SUFFIX, "an ExecuTorch program")


def check_calibration(precision: str, calibration, input_size: tuple[int, int]) -> None:
    check_calibration_request("ExecuTorch", PRECISIONS, precision, calibration, input_size)


def export_executorch(model, output: str | Path, input_size=None, precision: str = "fp32",
                      calibration=None, threads: int | None = None,
                      parity: ParityThresholds | None = None,
                      precision_config: PrecisionConfig | None = None,
                      log: Callable[[str], None] = print) -> ExportResult:
    """Write ``output`` (.pte) and return its parity with the PyTorch deploy form.

    ``precision="int8"`` needs ``calibration`` (a ``CalibrationSet`` at this input size);
    ``precision_config`` (INT8 only): its float layers stay out of PT2E quantization (by module
    name), and it is recorded in the metadata;
    ``threads``: the ExecuTorch thread pool size of the parity check (default ExecuTorch's);
    ``log`` gets the lowering's progress, the stage timings and the operator delegation."""
    import torch

    from lrformer_edge.models.deploy import check_input_size, to_deploy

    executorch_module("executorch.exir", "ExecuTorch export")
    output = check_output_path(output)
    input_size = check_input_size(input_size_of(model, input_size))
    check_calibration(precision, calibration, input_size)
    precision_config = check_int8_precision_config(
        "ExecuTorch", precision, precision_config, model, input_size, PRECISION_SCHEMES)
    start = time.time()
    deployed = to_deploy(model, input_size).eval()
    described = program_description(
        precision, **({"calibration_set": calibration.describe()} if calibration else {}),
        **({METADATA_KEY: precision_config.metadata()} if precision_config else {}))
    reserved = reserve_metadata(artifact_metadata(model, input_size, **described))
    from lrformer_edge.backends.executorch.lowering import lower_to_executorch

    lowered = lower_to_executorch(
        deployed, input_size, metadata_methods(reserved),
        calibration=None if calibration is None else
        [torch.from_numpy(batch) for batch in calibration.batches],
        float_layers=precision_config.float_layers if precision_config else (), log=log)
    feed = calibration.batches[0] if calibration is not None else parity_inputs(input_size)
    delegation = measure_delegation(lowered.buffer, feed, delegated_ops=lowered.delegated_ops,
                                    portable_ops=lowered.portable_ops)
    metadata = artifact_metadata(model, input_size, **described, **lowering_record(lowered),
                                 **{DELEGATION_KEY: delegation.as_dict()})
    buffer = fill_metadata(lowered.buffer, reserved, metadata)
    for line in export_report(decode_metadata(metadata)):
        log(line)
    agreement = write_checked_program(output, buffer, deployed, feed,
                                      parity or parity_thresholds(precision), output.name,
                                      threads=threads)
    return ExportResult(output, agreement, time.time() - start, op_counts(lowered),
                        decode_metadata(metadata))


def export_mixed_executorch(model, work_dir: str | Path, input_size,
                            precision_config: PrecisionConfig, calibration) -> ExportResult:
    """``Backend.export_mixed``: the INT8 program of ``precision_config`` as
    ``work_dir/model.pte``."""
    return export_executorch(model, Path(work_dir) / "model.pte", input_size, "int8",
                             calibration=calibration, precision_config=precision_config)


def program_description(precision: str, **extra) -> dict:
    """The metadata every ExecuTorch program of ours records beside the model's."""
    return dict(format=FORMAT, precision=precision, delegate=DELEGATE,
                executorch_version=importlib.metadata.version("executorch"), **extra)


def write_checked_program(output: Path, buffer: bytes, reference, feed, thresholds, what: str,
                          threads: int | None = None):
    """Write ``buffer`` to a temporary file beside ``output``, run it in ExecuTorch against
    ``reference`` (a torch module) on ``feed`` and rename it into place only if the parity holds;
    returns the parity."""
    agreement = None

    def write_checked(tmp: str) -> None:
        nonlocal agreement
        Path(tmp).write_bytes(buffer)
        agreement = check_parity(reference, ExecuTorchRunner(tmp, threads=threads), feed,
                                 thresholds, what)

    atomic_write(output, write_checked, suffix=PTE_SUFFIX)
    return agreement


def op_counts(lowered) -> dict[str, int]:
    """Every operator of the program, inside XNNPACK or not, by name."""
    return dict(sorted((lowered.delegated_ops + lowered.portable_ops).items()))


def lowering_record(lowered) -> dict:
    """What the lowering measured, as metadata: stage timings, operator counts inside XNNPACK
    and outside it, and (INT8) the PT2E quantization settings."""
    record = {STAGE_SECONDS_KEY: {stage: round(seconds, 2)
                                  for stage, seconds in lowered.stage_seconds.items()},
              XNNPACK_OPS_KEY: _counts(lowered.delegated_ops),
              PORTABLE_OPS_KEY: _counts(lowered.portable_ops)}
    if lowered.quantization:
        record["quantization"] = lowered.quantization
    return record


def _counts(counter: Counter) -> dict[str, int]:
    return dict(sorted(counter.items()))
