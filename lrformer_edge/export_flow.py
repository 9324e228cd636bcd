"""The export commands (``export_scripts/to_*.py``) after their arguments are parsed: load the
model (saying when a checkpoint's class count chose another variant), take the input size and
calibration set, export, print what was written and, with ``--validate N``, run the artifact on
N held-out procedural scenes against the FP32 PyTorch model: mIoU, delta and pixel agreement,
one implementation for every target.

A script hands its backend's exporter to ``export_command`` (``export(model, input_size,
calibration) -> ExportResult``), or a whole backend-specific flow to ``run_command`` (TensorRT's
two steps: ``backends/tensorrt/command.py``), which gets an ``ExportSession`` with the shared
steps. Backends are reached through the registry only, so a new backend's script needs nothing
here. Exit codes: 0 done, 1 an artifact check failed (nothing written), 2 bad input
(``artifacts.result.run_export_cli``); a backend's flow may add its own (TensorRT: 3).

Where an artifact cannot run here (Core ML off macOS), ``stand_in(model, path, calibration)``
(a PyTorch model computing what the artifact computes, e.g. Core ML's proxy) is measured in its
place: ``--proxy-images`` scenes, or the --validate scenes.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from lrformer_edge.artifacts.metadata import checkpoint_record
from lrformer_edge.artifacts.result import INPUT_ERROR_EXIT, run_export_cli
from lrformer_edge.backends import backend_for
from lrformer_edge.cli import calibration_from_args
from lrformer_edge.evaluation import (
    against_ground_truth,
    describe_against_ground_truth,
    procedural_validation_set,
    proxy_accuracy,
)
from lrformer_edge.models.factory import create_model
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.quant.qat import export_feed, restore
from lrformer_edge.resources import check_export_size


# ----------------------------------------------------------------------------- shared steps
def load_model(variant: str, checkpoint=None, log=print):
    """``create_model``, printing the one line that says when the checkpoint's class count chose
    another variant (and so another native size) than the one asked for."""
    model = create_model(variant, checkpoint=checkpoint)
    if model.variant_note:
        log(model.variant_note)
    return model


def check_exported_from(model, metadata: dict) -> None:
    """Refuse to compare an artifact with a PyTorch model it was not exported from."""
    recorded = metadata.get("checkpoint_sha256")
    if checkpoint_record(model) != recorded:
        raise ValueError(f"--validate compares with the PyTorch model the artifact was exported "
                         f"from; the artifact records checkpoint {recorded}, the given "
                         f"--variant/--checkpoint is {model.checkpoint_sha256}")


def validate_pipeline(model, pipeline, metadata: dict, images: int, name: str,
                      log=print) -> dict:
    """mIoU, its delta in points and the pixel agreement of ``pipeline`` (an artifact's) vs the
    FP32 PyTorch ``model`` on ``images`` held-out procedural scenes at the artifact's size."""
    check_exported_from(model, metadata)
    size = tuple(metadata["input_size"])
    result = against_ground_truth(model, pipeline, procedural_validation_set(images, size), size,
                                  name)
    log(describe_against_ground_truth(result, name))
    return result


def validate_artifact(model, path, images: int, name: str | None = None, log=print,
                      **runner_options) -> dict:
    """``validate_pipeline`` for the artifact at ``path``, run by its backend's runner
    (``runner_options``: e.g. ``providers`` of ONNX Runtime); ``name`` defaults to the
    backend's title and the file name."""
    path = Path(path)
    pipeline = SegmentationPipeline.from_artifact(path, **runner_options)
    name = name or f"{backend_for(path).title} {path.name}"
    return validate_pipeline(model, pipeline, pipeline.runner.metadata, images, name, log)


def describe_stand_in_accuracy(accuracy: dict) -> str:
    return (f"PyTorch proxy on {accuracy['images']} held-out scenes: mIoU "
            f"{100 * accuracy['proxy_mIoU']:.2f} vs FP32 {100 * accuracy['fp32_mIoU']:.2f} "
            f"({100 * (accuracy['proxy_mIoU'] - accuracy['fp32_mIoU']):+.2f} points), "
            f"pixel agreement {100 * accuracy['pixel_agreement']:.2f}%")


class ExportSession:
    """The shared steps of one export command, for its backend-specific part.

    Reads from ``args``: variant, checkpoint, input_size, validate and, where the export
    calibrates, calib_data, calib_images and seed (``cli.add_calibration_arguments``)."""

    def __init__(self, args, log=print):
        self.args, self.log = args, log

    def load_model(self):
        return load_model(self.args.variant, self.args.checkpoint, self.log)

    def input_size(self, model, calibrates: bool = False) -> tuple[int, int]:
        """--input-size, else the variant's native size, checked against this machine."""
        return check_export_size(model, self.args.input_size,
                                 self.args.calib_images if calibrates else 0)

    def calibration(self, data_config, input_size):
        return calibration_from_args(self.args, data_config, input_size, log=self.log)

    def restore_qat(self, checkpoint) -> tuple:
        """(fake-quant model, its checkpoint payload, the image its export is checked on)."""
        quantized, payload = restore(checkpoint)
        return quantized, payload, export_feed(quantized, payload)

    def validate(self, model, artifact, name: str | None = None, **runner_options) -> int:
        """--validate on ``artifact``: the exit code (0 also when --validate was not given)."""
        if not self.args.validate:
            return 0
        code, _ = run_export_cli(lambda: validate_artifact(
            model, artifact, self.args.validate, name, self.log, **runner_options))
        return code


def run_command(args, command: Callable[[ExportSession], int]) -> int:
    """A backend's own export flow, ``command(session)``: its exit code."""
    return command(ExportSession(args))


# ----------------------------------------------------------------------------- one-step exports
def export_command(args, export: Callable, *, what: str, calibrates: bool = False,
                   describe: Callable[[dict], Iterable[str]] | None = None,
                   stand_in: Callable | None = None, stand_in_images: int = 0) -> int:
    """Export once and report: ``export(model, input_size, calibration)`` writes the artifact
    (``calibration`` is None unless ``calibrates``); ``what`` names it in the first line;
    ``describe(metadata)`` gives lines about it beyond the summary. Then --validate runs the
    artifact; where its backend cannot run here, ``stand_in(model, path, calibration)`` is
    validated in its place (without a stand-in, --validate is an error there). The stand-in's
    accuracy on ``stand_in_images`` scenes is measured in any case (``--proxy-images``), unless
    --validate just measured it."""
    session = ExportSession(args)

    def run():
        model = session.load_model()
        size = session.input_size(model, calibrates)
        calibration = session.calibration(model.config.data, size) if calibrates else None
        print(f"exporting {model.config.name} at {size[0]}x{size[1]} to {what}")
        return model, size, calibration, export(model, size, calibration)

    code, done = run_export_cli(run)
    if done is None:
        return code
    model, size, calibration, result = done
    print(result.summary())
    for line in describe(result.metadata) if describe else ():
        print(line)
    backend = backend_for(result.path)
    reason = backend.unavailable_reason()
    if stand_in is not None:
        def proxy():
            return stand_in(model, result.path, calibration)

        if args.validate and reason:
            code, _ = run_export_cli(lambda: validate_pipeline(
                model, SegmentationPipeline.from_model(proxy(), size), result.metadata,
                args.validate, f"PyTorch proxy of {backend.title} {result.path.name}"))
        elif stand_in_images:
            code = _stand_in_accuracy(model, proxy, stand_in_images, size)
        if code:
            return code
    if reason is None:
        return session.validate(model, result.path)
    if args.validate and stand_in is None:
        print(f"error: --validate: {reason}", file=sys.stderr)
        return INPUT_ERROR_EXIT
    print(f"{reason}; check it where it runs with deploy/validate.py --artifacts {result.path}")
    return 0


def _stand_in_accuracy(model, proxy, images: int, size) -> int:
    """The one line of ``--proxy-images``: the stand-in (``proxy()``) vs FP32 PyTorch."""
    code, accuracy = run_export_cli(lambda: proxy_accuracy(model, proxy(), images, size))
    if accuracy is not None:
        print(describe_stand_in_accuracy(accuracy))
    return code
