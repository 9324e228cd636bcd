"""uint8 HxWx3 RGB image -> normalised (1, 3, H, W) float32 batch, exactly as the official test
pipeline prepares it. Pure numpy + OpenCV, so it runs on devices that have no torch.

Input rules (documented in the README):
* numpy arrays of dtype uint8 (or PIL images, converted to RGB);
* HxWx3 is taken as RGB; HxW and HxWx1 grayscale are replicated to three channels;
* HxWx4 is taken as RGBA and its alpha channel is dropped (not blended);
* anything else raises ``ImageInputError`` saying what was received.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


class ImageInputError(ValueError):
    """An input image that is not an HxWx3 uint8 RGB array (or convertible by the rules)."""


def as_rgb_uint8(image) -> np.ndarray:
    """Validate ``image`` and return it as a contiguous HxWx3 uint8 RGB array."""
    if image is not None and type(image).__module__.startswith("PIL."):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ImageInputError(
            f"expected an image as a numpy array of shape HxWx3 and dtype uint8, got "
            f"{type(image).__name__}")
    if image.dtype != np.uint8:
        hint = (" (scale float images in [0, 1] with (img * 255).round().astype(np.uint8))"
                if np.issubdtype(image.dtype, np.floating) else "")
        raise ImageInputError(f"expected dtype uint8 pixels in 0..255, got {image.dtype}{hint}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise ImageInputError(
            f"expected an HxWx3 RGB image (HxW / HxWx1 grayscale and HxWx4 RGBA are converted), "
            f"got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageInputError(f"image is empty: shape {image.shape}")
    return np.ascontiguousarray(image)


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Fit (height, width) into ``scale`` = (long, short) keeping the aspect ratio (mmcv rule)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def align_size(height: int, width: int, divisor: int = 32) -> tuple[int, int]:
    """Round each side up to a multiple of ``divisor``."""
    return (int(math.ceil(height / divisor)) * divisor,
            int(math.ceil(width / divisor)) * divisor)


def network_input_size(height: int, width: int, scale: tuple[int, int],
                    divisor: int = 32) -> tuple[int, int]:
    """The network input size the official test pipeline gives an image of this size."""
    return align_size(*rescale_size(height, width, scale), divisor)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to (height, width), as mmcv.imresize does it (OpenCV INTER_LINEAR)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """HxWx3 uint8 RGB -> 1x3xHxW float32, ``(pixel - mean) / std`` per channel."""
    pixels = image.astype(np.float32)
    pixels -= np.asarray(mean, np.float32)
    pixels /= np.asarray(std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


@dataclass
class Preprocessed:
    batch: np.ndarray  # (1, 3, H, W) float32, normalised
    original_size: tuple[int, int]  # (height, width) of the caller's image
    input_size: tuple[int, int]  # (height, width) fed to the network


def preprocess(image, mean, std, scale: tuple[int, int] = (2048, 512), divisor: int = 32,
               input_size: tuple[int, int] | None = None) -> Preprocessed:
    """The official test transform, or a plain resize to ``input_size`` for fixed-size artifacts.

    Official (``input_size=None``): rescale to fit ``scale`` keeping the aspect ratio, then resize
    each side up to a multiple of ``divisor`` (two bilinear resizes, as mmseg's AlignResize).
    """
    image = as_rgb_uint8(image)
    original = image.shape[:2]
    if input_size is None:
        image = resize(image, rescale_size(*original, scale))
        image = resize(image, align_size(*image.shape[:2], divisor))
    else:
        image = resize(image, tuple(input_size))
    return Preprocessed(normalize(image, mean, std), original, image.shape[:2])
