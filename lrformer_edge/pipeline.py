"""SegmentationPipeline: image -> preprocess -> runner -> postprocess -> label map.

The same path serves the PyTorch ground truth and every exported artifact, so accuracy
differences between backends come from the backend alone.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from lrformer_edge.artifacts.runner import Runner
from lrformer_edge.postprocess import labels_at_size, logits_to_labels, overlay
from lrformer_edge.preprocess import as_rgb_uint8, preprocess
from lrformer_edge.registry import DataConfig


@dataclass
class Prediction:
    labels: np.ndarray  # HxW class ids at the caller's image size
    logits: np.ndarray | None  # (1, C, h, w) at network input size; None for label outputs
    input_size: tuple[int, int]
    inference_seconds: float
    preprocess_seconds: float = 0.0
    postprocess_seconds: float = 0.0


class SegmentationPipeline:
    """``pipeline(image) -> HxW labels`` for an HxWx3 uint8 RGB image.

    ``input_size=None`` uses the official test transform (keep ratio, align to 32); a fixed
    ``input_size`` (for fixed-resolution artifacts) resizes every image to it.

    Use it as a context for more than one image: ``with pipeline:`` activates the runner once
    (loads the model, deserialises a TensorRT engine, allocates device memory) and releases it at
    the end. A call outside the context (or outside ``with pipeline.runner:``) is a convenience
    for one-off predictions: it activates the runner for that call only, and warns once
    (RuntimeWarning) that it does, since per frame that cost is paid every time.
    """

    def __init__(self, runner: Runner, data: DataConfig,
                 input_size: tuple[int, int] | None = None):
        self.runner = runner
        self.data = data
        self.input_size = tuple(input_size) if input_size else _fixed_size(runner)
        self._warned_activation_per_call = False

    @classmethod
    def from_model(cls, model, input_size=None, device=None) -> "SegmentationPipeline":
        # Imported here: the pipeline runs exported artifacts where PyTorch is not installed.
        from lrformer_edge.backends.pytorch.runner import TorchRunner

        return cls(TorchRunner(model, input_size=input_size, device=device), model.config.data,
                   input_size)

    @classmethod
    def from_artifact(cls, path, **runner_options) -> "SegmentationPipeline":
        """A pipeline over an exported artifact, configured from the metadata it embeds."""
        from lrformer_edge.artifacts.metadata import data_config_from_metadata
        from lrformer_edge.backends import load_runner

        runner = load_runner(path, **runner_options)
        return cls(runner, data_config_from_metadata(runner.metadata))

    def __enter__(self) -> "SegmentationPipeline":
        self.runner.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.runner.deactivate()

    def predict(self, image) -> Prediction:
        return self._predict(image)

    def __call__(self, image) -> np.ndarray:
        return self._predict(image).labels

    def _predict(self, image) -> Prediction:
        start = time.perf_counter()
        prepared = preprocess(image, self.data.mean, self.data.std, self.data.test_scale,
                              self.data.size_divisor, self.input_size)
        if self.runner.active:
            outputs = self._infer(prepared.batch)
        else:
            self._warn_activation_per_call()
            with self.runner:
                outputs = self._infer(prepared.batch)
        inferred = time.perf_counter()
        output = outputs[self.runner.output_names[0]]
        if np.issubdtype(output.dtype, np.integer):
            # Artifacts that end in argmax (Core ML --output-type labels) give class ids:
            # nearest resizing is all that can be done with them.
            logits, labels = None, labels_at_size(output, prepared.original_size)
        else:
            logits = output
            labels = logits_to_labels(logits, prepared.original_size)
        inference = self.runner.last_inference_time
        preprocessing = inferred - start - inference
        return Prediction(labels, logits, prepared.input_size, inference, preprocessing,
                          time.perf_counter() - inferred)

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.infer({self.runner.input_specs[0].name: batch})

    def _warn_activation_per_call(self) -> None:
        if self._warned_activation_per_call:
            return
        self._warned_activation_per_call = True
        warnings.warn(
            f"SegmentationPipeline({self.runner.name}) used outside `with pipeline:` activates "
            f"and releases its runner on every call (re-loading the model or engine each time); "
            f"use `with pipeline:` for more than one image", RuntimeWarning,
            stacklevel=4)  # the caller of predict() or __call__

    def overlay(self, image, labels: np.ndarray, opacity: float = 0.5) -> np.ndarray:
        return overlay(as_rgb_uint8(image), labels, self.data.palette, opacity)


def _fixed_size(runner: Runner) -> tuple[int, int] | None:
    shape = runner.input_specs[0].shape
    if len(shape) == 4 and shape[2] is not None and shape[3] is not None:
        return int(shape[2]), int(shape[3])
    return None
