"""Runners: one interface (``with runner: runner.infer(feed)``) over every backend.

``load_runner(path)`` picks the backend from the artifact: a PyTorch checkpoint (``.pth``,
``.pt``, ``.safetensors``), an ONNX model (``.onnx``), an OpenVINO IR (``.xml`` or its folder), a
TensorRT engine (``.engine``/``.plan`` with its JSON sidecar) or a Core ML ``.mlpackage``
(predicts on macOS only). SDKs are imported only when used.
"""
from __future__ import annotations

from pathlib import Path

from lrformer_edge.artifacts.optional import MissingDependencyError
from lrformer_edge.artifacts.runner import (
    Runner,
    RunnerInputError,
    RunnerStateError,
    TensorSpec,
)

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
TENSORRT_SUFFIXES = (".engine", ".plan")
ARTIFACT_SUFFIXES = TORCH_SUFFIXES + (".onnx", ".xml") + TENSORRT_SUFFIXES + (".mlpackage",)


def load_runner(path: str | Path, variant: str | None = None, **options) -> Runner:
    """The runner for an artifact, chosen from its type and metadata.

    ``variant`` names the registry variant of a checkpoint that does not record it; naming one
    that differs from the variant the artifact records is a ValueError, never silently ignored.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact {path} does not exist")
    if path.suffix in TORCH_SUFFIXES:
        from lrformer_edge.backends.pytorch.runner import TorchRunner
        from lrformer_edge.models.checkpoint import checkpoint_variant
        from lrformer_edge.models.factory import create_model

        recorded = checkpoint_variant(path)
        _check_variant_matches(path, variant, recorded)  # before building the wrong model
        variant = variant or recorded
        if variant is None:
            raise ValueError(f"{path} does not record its variant (official checkpoints do not): "
                             f"name it, e.g. load_runner(path, variant='lrformer-t')")
        return TorchRunner(create_model(variant, checkpoint=path), **options)
    runner = _exported_runner(path, **options)
    if variant is not None:
        _check_variant_matches(path, variant, runner.metadata.get("variant"))
    return runner


def _check_variant_matches(path: Path, asked: str | None, recorded: str | None) -> None:
    if asked and recorded and asked != recorded:
        raise ValueError(f"variant {asked} was asked for, but {path} records variant "
                         f"{recorded}: leave the variant out or name {recorded}")


def _exported_runner(path: Path, **options) -> Runner:
    if path.suffix == ".onnx":
        from lrformer_edge.backends.onnxruntime.runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, **options)
    if path.suffix == ".xml" or (path.is_dir() and any(path.glob("*.xml"))):
        from lrformer_edge.backends.openvino.runner import OpenVINORunner

        return OpenVINORunner(path, **options)
    if path.suffix in TENSORRT_SUFFIXES:
        from lrformer_edge.backends.tensorrt.runner import TensorRTRunner

        return TensorRTRunner(path, **options)
    if path.suffix == ".mlpackage":
        from lrformer_edge.backends.coreml.runner import CoreMLRunner

        return CoreMLRunner(path, **options)
    raise ValueError(f"cannot tell which backend runs {path}: expected one of "
                     f"{', '.join(ARTIFACT_SUFFIXES)} "
                     f"or an OpenVINO IR folder")


__all__ = ["MissingDependencyError", "Runner", "RunnerInputError", "RunnerStateError",
           "TensorSpec", "load_runner"]
