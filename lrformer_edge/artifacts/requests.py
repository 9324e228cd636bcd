"""Checks of an export request that every single-file exporter makes before any work: the
output's suffix and the precision/calibration pair. One wording for every backend."""
from __future__ import annotations

from pathlib import Path

from lrformer_edge.files import check_output_file


def check_output_suffix(path: str | Path, suffix: str, kind: str) -> Path:
    """``path`` as an output file ending in ``suffix``; ``kind`` names the artifact in the
    message ("an ExecuTorch program")."""
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{kind} is a {suffix} file; got output {path} "
                         f"(name it e.g. {path.with_suffix(suffix).name})")
    return check_output_file(path)


def check_calibration_request(backend: str, precisions: tuple[str, ...], precision: str,
                              calibration, input_size: tuple[int, int]) -> None:
    """``precision`` is one of ``precisions``; int8, and only int8, comes with a calibration set
    that holds images at ``input_size``. ``backend`` names the backend in the message."""
    if precision not in precisions:
        raise ValueError(f"{backend} precision must be one of {precisions}, got {precision!r}")
    if precision == "int8" and calibration is None:
        raise ValueError("int8 needs a calibration set (build_calibration_set(...))")
    if precision != "int8" and calibration is not None:
        raise ValueError("calibration data applies to int8 only")
    if calibration is not None and not calibration.batches:
        raise ValueError(f"the calibration set from {calibration.source} holds no images: "
                         f"int8 needs at least one")
    if calibration is not None and tuple(calibration.batches[0].shape[2:]) != input_size:
        size = "x".join(map(str, calibration.batches[0].shape[2:]))
        raise ValueError(f"the calibration set is {size}, the export is at "
                         f"{input_size[0]}x{input_size[1]}: build it at the export's size")


def check_int8_precision_config(backend: str, precision: str, config, model, input_size,
                                schemes: tuple[str, ...]):
    """A precision config applies to ``backend``'s INT8 export only (its float precisions
    quantize nothing to keep in float), and must fit the model (``checked_precision_config``)."""
    from lrformer_edge.artifacts.precision_config import checked_precision_config

    if config is not None and precision != "int8":
        raise ValueError(f"a precision config applies to {backend} INT8 only; this export is "
                         f"{precision}")
    return checked_precision_config(config, model, input_size, schemes, f"{backend} INT8")
