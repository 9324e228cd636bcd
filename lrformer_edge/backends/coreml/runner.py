"""Core ML runner (macOS only for prediction; the package's description is read anywhere).

Like every runner it takes the preprocessed ``input`` batch, (1, 3, H, W) float32 normalised
with the model's mean/std. Packages with an image input get the pixels back (the inverse of the
normalisation, rounded: exact for batches made by ``preprocess`` from uint8 images) as the RGB
image Core ML expects; the normalisation then happens inside the model, as it will on a device.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.optional import require
from lrformer_edge.artifacts.runner import Runner, RunnerStateError, TensorSpec

COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU",
                 "cpu_and_ne": "CPU_AND_NE"}
INPUT_NAME = "input"


class CoreMLUnavailable(RunnerStateError):
    """Core ML prediction was asked for where Core ML does not exist."""


def coreml_unavailable_reason() -> str | None:
    if sys.platform != "darwin":
        return (f"Core ML prediction needs macOS 13 or newer on Apple hardware; this is "
                f"{sys.platform}. Here the package can only be inspected "
                f"(lrformer_edge.backends.coreml.inspect.inspect_package)")
    return None


class CoreMLRunner(Runner):
    backend = "coreml"

    def __init__(self, path: str | Path, compute_units: str = "all", name: str | None = None):
        if compute_units not in COMPUTE_UNITS:
            raise ValueError(f"compute_units must be one of {tuple(COMPUTE_UNITS)}, "
                             f"got {compute_units!r}")
        path = Path(path)
        if path.suffix != ".mlpackage" or not (path / "Manifest.json").is_file():
            raise ValueError(f"{path} is not a Core ML .mlpackage folder (with Manifest.json)")
        super().__init__(name or f"coreml:{path.name}:{compute_units}")
        self.path, self.compute_units = path, compute_units
        from lrformer_edge.artifacts.metadata import decode_metadata
        from lrformer_edge.backends.coreml.inspect import inspect_package

        self.report = inspect_package(path)
        self._metadata = decode_metadata(self.report.metadata)
        self._model = None

    @property
    def metadata(self) -> dict:
        return dict(self._metadata)

    @property
    def _package_input(self) -> dict:
        return self.report.inputs[0]

    @property
    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec(INPUT_NAME, "float32", tuple(self._package_input["shape"]))]

    @property
    def output_names(self) -> list[str]:
        return [output["name"] for output in self.report.outputs]

    @property
    def settings(self) -> dict:
        return {"compute_units": self.compute_units,
                "input": self._package_input["kind"],
                "coreml_options": self._metadata.get("coreml_options")}

    def _activate(self) -> None:
        reason = coreml_unavailable_reason()
        if reason:
            raise CoreMLUnavailable(reason)
        ct = require("coremltools", "coreml", "the Core ML runner")
        units = getattr(ct.ComputeUnit, COMPUTE_UNITS[self.compute_units])
        self._model = ct.models.MLModel(str(self.path), compute_units=units)

    def _deactivate(self) -> None:
        self._model = None

    def _package_feed(self, batch: np.ndarray):
        spec = self._package_input
        if spec["kind"] == "tensor":
            return {spec["name"]: batch}
        from PIL import Image

        mean = np.asarray(self._metadata["mean"], np.float32).reshape(3, 1, 1)
        std = np.asarray(self._metadata["std"], np.float32).reshape(3, 1, 1)
        pixels = np.clip(np.rint(batch[0] * std + mean), 0, 255).astype(np.uint8)
        return {spec["name"]: Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))}

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._model.predict(self._package_feed(feed[INPUT_NAME]))
        return {name: np.asarray(outputs[name]) for name in self.output_names}
