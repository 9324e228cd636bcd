"""LiteRT export: the deploy form converted to a ``.tflite`` (``convert``), FP32, FP16 or INT8,
carrying the artifact metadata (``format``), checked against PyTorch in LiteRT's interpreter
before it is written.

The model is written to a temporary file beside ``output``, run by ``LiteRTRunner`` and
compared with the deploy form on the parity feed (INT8: one calibration image, with the INT8
bounds), and renamed into place only when that passed: never a half-written or unchecked file.
"""
from __future__ import annotations

import importlib.metadata
import time
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
from lrformer_edge.backends.litert.format import (
    PRECISION_SCHEMES,
    PRECISIONS,
    TFLITE_SUFFIX,
    litert_module,
    with_metadata,
)
from lrformer_edge.backends.litert.runner import LiteRTRunner
from lrformer_edge.files import atomic_write
from lrformer_edge.registry import input_size_of

FORMAT = "litert-tflite"
INT8_OPS_KEY = "int8_ops"  # operator -> count computing in int8
FLOAT_OPS_KEY = "float_ops"  # operator -> count computing in float
STAGE_SECONDS_KEY = "export_stage_seconds"


def check_output_path(path: str | Path) -> Path:
    return check_output_suffix(path, TFLITE_SUFFIX, "a LiteRT model")


def check_calibration(precision: str, calibration, input_size: tuple[int, int]) -> None:
    check_calibration_request("LiteRT", PRECISIONS, precision, calibration, input_size)


def export_litert(model, output: str | Path, input_size=None, precision: str = "fp32",
                  calibration=None, threads: int | None = None,
                  parity: ParityThresholds | None = None,
                  precision_config: PrecisionConfig | None = None,
                  log: Callable[[str], None] = print) -> ExportResult:
    """Write ``output`` (.tflite) and return its parity with the PyTorch deploy form.

    ``precision="int8"`` needs ``calibration`` (a ``CalibrationSet`` at this input size);
    ``precision_config`` (INT8 only): the operators of its float layers stay float (found by
    weight, ``layer_ops.py``), and it is recorded in the metadata;
    ``threads``: LiteRT's thread count for calibration and the parity check (default LiteRT's);
    ``log`` gets the stage timings and the operators that stay float."""
    from lrformer_edge.backends.litert.convert import convert, operator_counts
    from lrformer_edge.models.deploy import check_input_size, to_deploy

    litert_module("litert_torch", "LiteRT export")
    litert_module("ai_edge_quantizer", "LiteRT export")
    output = check_output_path(output)
    input_size = check_input_size(input_size_of(model, input_size))
    check_calibration(precision, calibration, input_size)
    precision_config = check_int8_precision_config(
        "LiteRT", precision, precision_config, model, input_size, PRECISION_SCHEMES)
    start = time.time()
    deployed = to_deploy(model, input_size).eval()
    converted = convert(deployed, input_size, precision,
                        calibration=None if calibration is None else calibration.batches,
                        threads=threads,
                        float_layers=precision_config.float_layers if precision_config else ())
    int8_ops, float_ops = operator_counts(converted.model)
    metadata = artifact_metadata(
        model, input_size, **model_description(precision),
        **({"calibration_set": calibration.describe()} if calibration else {}),
        **({METADATA_KEY: precision_config.metadata()} if precision_config else {}),
        **({"quantization_recipe": converted.recipe} if converted.recipe else {}),
        **{STAGE_SECONDS_KEY: {stage: round(seconds, 2)
                               for stage, seconds in converted.stage_seconds.items()},
           INT8_OPS_KEY: dict(sorted(int8_ops.items())),
           FLOAT_OPS_KEY: dict(sorted(float_ops.items()))})
    for line in export_report(decode_metadata(metadata)):
        log(line)
    feed = calibration.batches[0] if calibration is not None else parity_inputs(input_size)
    agreement = write_checked_model(output, with_metadata(converted.model, metadata), deployed,
                                    feed, parity or parity_thresholds(precision), output.name,
                                    threads=threads)
    return ExportResult(output, agreement, time.time() - start,
                        dict(sorted((int8_ops + float_ops).items())), decode_metadata(metadata))


def export_mixed_litert(model, work_dir: str | Path, input_size,
                        precision_config: PrecisionConfig, calibration) -> ExportResult:
    """``Backend.export_mixed``: the INT8 model of ``precision_config`` as
    ``work_dir/model.tflite``."""
    return export_litert(model, Path(work_dir) / "model.tflite", input_size, "int8",
                         calibration=calibration, precision_config=precision_config)


def model_description(precision: str) -> dict:
    """The metadata every LiteRT model of ours records beside the model's."""
    return dict(format=FORMAT, precision=precision,
                litert_torch_version=importlib.metadata.version("litert-torch"),
                ai_edge_quantizer_version=importlib.metadata.version("ai-edge-quantizer"),
                ai_edge_litert_version=importlib.metadata.version("ai-edge-litert"))


def export_report(metadata) -> list[str]:
    """Lines saying how long each export stage took and which operators stay float."""
    lines = []
    stages = metadata.get(STAGE_SECONDS_KEY) or {}
    if stages:
        lines.append("export stages: " + ", ".join(f"{stage} {seconds:.1f} s"
                                                  for stage, seconds in stages.items()))
    int8_ops, float_ops = metadata.get(INT8_OPS_KEY) or {}, metadata.get(FLOAT_OPS_KEY) or {}
    if int8_ops:
        listed = ", ".join(f"{op} x{count}" for op, count in _by_count(int8_ops))
        lines.append(f"int8 operators: {sum(int8_ops.values())} ({listed})")
        listed = ", ".join(f"{op} x{count}" for op, count in _by_count(float_ops))
        lines.append(f"operators that stay float: {sum(float_ops.values())} ({listed})")
    return lines


def _by_count(counts: dict) -> list:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def write_checked_model(output: Path, model: bytes, reference, feed, thresholds, what: str,
                        threads: int | None = None):
    """Write ``model`` to a temporary file beside ``output``, run it in LiteRT against
    ``reference`` (a torch module) on ``feed`` and rename it into place only if the parity holds;
    returns the parity."""
    agreement = None

    def write_checked(tmp: str) -> None:
        nonlocal agreement
        Path(tmp).write_bytes(model)
        agreement = check_parity(reference, LiteRTRunner(tmp, threads=threads), feed,
                                 thresholds, what)

    atomic_write(output, write_checked, suffix=TFLITE_SUFFIX)
    return agreement
