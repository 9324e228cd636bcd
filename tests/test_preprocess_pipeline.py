"""Preprocessing (official test transform), postprocessing, runner checks, the pipeline."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lrformer_edge.backends import RunnerInputError, RunnerStateError
from lrformer_edge.backends.pytorch.runner import TorchRunner
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.postprocess import colorize, logits_to_labels, overlay, resize_logits
from lrformer_edge.preprocess import (
    ImageInputError,
    align_size,
    as_rgb_uint8,
    network_input_size,
    preprocess,
    rescale_size,
)
from lrformer_edge.registry import ADE20K


@pytest.mark.parametrize("size, expected", [
    ((512, 683), (512, 683)),      # ADE-like: short side already 512
    ((375, 500), (512, 683)),      # upscaled: 512/375 = 1.365 -> 682.7 -> 683
    ((1024, 2048), (512, 1024)),   # Cityscapes frame under the ADE (2048, 512) scale
    ((300, 3000), (205, 2048)),    # the long side binds
])
def test_rescale_size_follows_mmcv(size, expected):
    assert rescale_size(*size, (2048, 512)) == expected


def test_align_and_network_input_size():
    assert align_size(512, 683) == (512, 704)
    assert network_input_size(375, 500, (2048, 512)) == (512, 704)
    height, width = network_input_size(123, 457, (2048, 512))
    assert height % 32 == 0 and width % 32 == 0


def test_normalisation_uses_rgb_mean_and_std():
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0] = 255
    batch = preprocess(image, ADE20K.mean, ADE20K.std, input_size=(32, 32)).batch
    assert batch.shape == (1, 3, 32, 32) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0, :, 0, 0], [(255 - 123.675) / 58.395,
                                                   -116.28 / 57.12, -103.53 / 57.375], rtol=1e-6)


def test_grayscale_and_rgba_conversion_rules(rgb_image):
    gray = rgb_image[..., 0]
    assert (as_rgb_uint8(gray) == gray[..., None]).all()
    assert as_rgb_uint8(gray[..., None]).shape == (70, 90, 3)
    rgba = np.concatenate([rgb_image, np.zeros_like(rgb_image[..., :1])], axis=2)
    assert (as_rgb_uint8(rgba) == rgb_image).all()  # alpha dropped, not blended


def test_pil_images_are_accepted(rgb_image):
    from PIL import Image

    assert (as_rgb_uint8(Image.fromarray(rgb_image)) == rgb_image).all()


@pytest.mark.parametrize("bad, message", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 2), np.uint8), r"got shape \(8, 8, 2\)"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
    (np.zeros((2, 8, 8, 3), np.uint8), "HxWx3"),
    ("image.jpg", "numpy array"),
    (None, "numpy array"),
])
def test_bad_images_get_clear_errors(bad, message):
    with pytest.raises(ImageInputError, match=message):
        as_rgb_uint8(bad)


def test_logits_resize_and_argmax_numpy_matches_torch():
    logits = np.random.default_rng(0).normal(size=(1, 5, 16, 24)).astype(np.float32)
    by_torch = resize_logits(torch.from_numpy(logits), (40, 50)).numpy()
    by_numpy = resize_logits(logits, (40, 50))
    np.testing.assert_allclose(by_numpy, by_torch, atol=1e-4)
    labels = logits_to_labels(logits, (40, 50))
    assert labels.shape == (40, 50) and labels.dtype == np.uint8


def test_colorize_and_overlay():
    labels = np.array([[0, 1], [1, 2]])
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert (colorize(labels, palette)[1, 1] == (0, 0, 255)).all()
    image = np.full((2, 2, 3), 100, np.uint8)
    assert (overlay(image, labels, palette, 0.0) == image).all()
    assert (overlay(image, labels, palette, 1.0) == colorize(labels, palette)).all()
    with pytest.raises(ValueError, match="opacity"):
        overlay(image, labels, palette, 1.5)


def test_runner_checks_feed_before_inference(tiny_model):
    runner = TorchRunner(tiny_model, input_size=(64, 64))
    with pytest.raises(RunnerStateError, match="with runner"):
        runner.infer(np.zeros((1, 3, 64, 64), np.float32))
    with runner:
        with pytest.raises(RunnerInputError, match=r"dtype float64, expected float32"):
            runner.infer({"input": np.zeros((1, 3, 64, 64))})
        with pytest.raises(RunnerInputError, match=r"shape \(1, 3, 32, 64\), expected "
                                                   r"input: float32\[\?, 3, 64, 64\]"):
            runner.infer({"input": np.zeros((1, 3, 32, 64), np.float32)})
        with pytest.raises(RunnerInputError, match=r"missing \['input'\]"):
            runner.infer({"images": np.zeros((1, 3, 64, 64), np.float32)})
        outputs = runner.infer(np.zeros((2, 3, 64, 64), np.float32))
        assert outputs["logits"].shape == (2, 150, 64, 64)
        assert runner.last_inference_time > 0
    assert not runner.active


def test_pipeline_returns_labels_at_original_size_for_any_image_size(tiny_model, rgb_image):
    pipeline = SegmentationPipeline.from_model(tiny_model)
    with pytest.warns(RuntimeWarning, match="outside `with pipeline:`"):
        prediction = pipeline.predict(rgb_image)  # 70x90: not a multiple of 32
    assert prediction.labels.shape == (70, 90)
    assert prediction.input_size == network_input_size(70, 90, ADE20K.test_scale)
    assert prediction.labels.max() < 150
    # The pipeline equals model -> resize -> argmax done by hand.
    with torch.no_grad():
        logits = tiny_model(torch.from_numpy(
            preprocess(rgb_image, ADE20K.mean, ADE20K.std).batch))
    manual = logits_to_labels(logits, (70, 90))
    assert (prediction.labels == manual).all()


def test_fixed_size_pipeline_resizes_to_the_artifact_size(tiny_model, rgb_image):
    runner = TorchRunner(tiny_model, input_size=(64, 96))
    with SegmentationPipeline(runner, ADE20K) as pipeline:
        prediction = pipeline.predict(rgb_image)
    assert prediction.input_size == (64, 96) and prediction.labels.shape == (70, 90)


def _counting_activations(runner) -> list:
    calls = []
    activate = runner._activate
    runner._activate = lambda: (calls.append(1), activate())
    return calls


def test_pipeline_outside_its_context_activates_per_call_and_warns_once(tiny_model, rgb_image):
    runner = TorchRunner(tiny_model, input_size=(64, 64))
    activations = _counting_activations(runner)
    pipeline = SegmentationPipeline(runner, ADE20K)
    with pytest.warns(RuntimeWarning, match="activates and releases its runner on every call") \
            as caught:
        first = pipeline(rgb_image)
    assert caught[0].filename == __file__  # points at the caller, not at the pipeline
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        second = pipeline(rgb_image)
    assert len(activations) == 2 and not runner.active  # loaded and released per call
    assert (first == second).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pipeline:  # the context: one activation for every frame, no warning
            for _ in range(3):
                pipeline(rgb_image)
            assert runner.active
    assert len(activations) == 3 and not runner.active
    assert "with pipeline:" in SegmentationPipeline.__doc__


class _ModelStub(torch.nn.Module):
    """Stands for a model on a CUDA device: ``to`` moves nothing (no GPU needed)."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail = fail

    def to(self, *args, **kwargs):
        if self.fail:
            raise RuntimeError("CUDA out of memory")
        return self


@pytest.fixture
def tf32_on():
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _tf32() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_torch_runner_turns_tf32_off_while_active_and_restores_it(tf32_on):
    runner = TorchRunner(_ModelStub(), device="cuda")
    with runner:
        assert _tf32() == (False, False)  # true fp32, as the reference tolerances assume
    assert _tf32() == (True, True)  # the process's own setting is back
    failing = TorchRunner(_ModelStub(fail=True), device="cuda")
    with pytest.raises(RuntimeError, match="out of memory"):
        failing.activate()
    assert _tf32() == (True, True) and not failing.active
    with TorchRunner(_ModelStub(), device="cpu"):
        assert _tf32() == (True, True)  # CPU runs leave CUDA settings alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")
def test_torch_runner_on_cuda_restores_tf32(tf32_on, tiny_model):
    with TorchRunner(tiny_model, input_size=(64, 64), device="cuda") as runner:
        assert _tf32() == (False, False)
        logits = runner.infer(np.zeros((1, 3, 64, 64), np.float32))["logits"]
    assert _tf32() == (True, True) and np.isfinite(logits).all()
    tiny_model.to("cpu")
