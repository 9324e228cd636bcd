"""Logits -> label map at the caller's image size; label map -> colours and overlays.

Works on numpy arrays (OpenCV resize) so a device without torch can run it; torch tensors are
resized with ``F.interpolate`` exactly as mmseg does.
"""
from __future__ import annotations

import numpy as np


def resize_logits(logits, size: tuple[int, int]):
    """Bilinear (align_corners=False) resize of (1, C, h, w) logits to ``size`` = (H, W)."""
    if type(logits).__module__.startswith("torch"):
        import torch.nn.functional as F

        if tuple(logits.shape[2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    import cv2

    logits = np.asarray(logits, dtype=np.float32)
    if logits.shape[2:] == tuple(size):
        return logits
    channels_last = logits[0].transpose(1, 2, 0)
    # OpenCV resizes at most 4 interleaved channels per call.
    chunks = [cv2.resize(np.ascontiguousarray(channels_last[..., i:i + 4]),
                         (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
              for i in range(0, channels_last.shape[2], 4)]
    resized = np.concatenate([c.reshape(size[0], size[1], -1) for c in chunks], axis=2)
    return resized.transpose(2, 0, 1)[None]


def logits_to_labels(logits, original_size: tuple[int, int]) -> np.ndarray:
    """Resize logits to the original image size and take the per-pixel argmax (HxW uint8/int)."""
    resized = resize_logits(logits, original_size)
    if type(resized).__module__.startswith("torch"):
        labels = resized[0].argmax(0).cpu().numpy()
    else:
        labels = resized[0].argmax(0)
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.int32)


def labels_at_size(labels, size: tuple[int, int]) -> np.ndarray:
    """(1, h, w) or (h, w) class ids -> HxW at ``size`` by nearest-neighbour resizing."""
    import cv2

    labels = np.asarray(labels).reshape(labels.shape[-2:])
    if labels.shape != tuple(size):
        labels = cv2.resize(labels.astype(np.int32), (size[1], size[0]),
                            interpolation=cv2.INTER_NEAREST)
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.int32)


def colorize(labels: np.ndarray, palette) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 RGB using ``palette`` (ids beyond it are black)."""
    lut = np.zeros((max(256, len(palette)), 3), np.uint8)
    lut[:len(palette)] = np.asarray(palette, np.uint8)
    return lut[np.asarray(labels, np.int64)]


def overlay(image: np.ndarray, labels: np.ndarray, palette, opacity: float = 0.5) -> np.ndarray:
    """Blend the coloured label map over the RGB image; ``opacity`` 0 shows only the image."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity}")
    colours = colorize(labels, palette).astype(np.float32)
    blended = image.astype(np.float32) * (1.0 - opacity) + colours * opacity
    return blended.round().clip(0, 255).astype(np.uint8)
