"""Drawing on frames: the class overlay, a legend of the classes present and a status panel.

The status panel sits in the top-left corner and the legend in the bottom-left corner; the rest
of the frame is the plain overlay (tests rely on that to check colours).
"""
from __future__ import annotations

import cv2
import numpy as np

from lrformer_edge.postprocess import overlay

FONT = cv2.FONT_HERSHEY_SIMPLEX
LINE_HEIGHT = 16
TEXT_SCALE = 0.42
PANEL_WIDTH = 190
SWATCH = 10


def classes_present(labels: np.ndarray, min_fraction: float = 0.002) -> list[int]:
    """Class ids covering at least ``min_fraction`` of the frame, largest first."""
    counts = np.bincount(labels.ravel(), minlength=1)
    keep = np.nonzero(counts >= min_fraction * labels.size)[0]
    return [int(c) for c in keep[np.argsort(-counts[keep])]]


def _box(image: np.ndarray, top: int, left: int, height: int, width: int) -> None:
    bottom, right = min(image.shape[0], top + height), min(image.shape[1], left + width)
    region = image[top:bottom, left:right]
    region[:] = (region.astype(np.uint16) // 3).astype(np.uint8)  # darkened, still see-through


def draw_status(image: np.ndarray, lines: list[str]) -> None:
    _box(image, 0, 0, LINE_HEIGHT * len(lines) + 6, PANEL_WIDTH)
    for row, text in enumerate(lines):
        cv2.putText(image, text, (4, LINE_HEIGHT * (row + 1)), FONT, TEXT_SCALE,
                    (255, 255, 255), 1, cv2.LINE_AA)


def draw_legend(image: np.ndarray, class_ids: list[int], class_names, palette,
                max_entries: int = 8) -> None:
    fits = max(1, image.shape[0] // 3 // LINE_HEIGHT)  # at most a third of the frame's height
    entries = class_ids[:min(max_entries, fits)]
    if not entries:
        return
    height = LINE_HEIGHT * len(entries) + 6
    top = image.shape[0] - height
    _box(image, top, 0, height, PANEL_WIDTH)
    for row, class_id in enumerate(entries):
        y = top + LINE_HEIGHT * (row + 1)
        colour = tuple(int(c) for c in palette[class_id]) if class_id < len(palette) else (0, 0, 0)
        cv2.rectangle(image, (4, y - SWATCH), (4 + SWATCH, y), colour, -1)
        name = class_names[class_id] if class_id < len(class_names) else str(class_id)
        cv2.putText(image, name, (8 + SWATCH, y), FONT, TEXT_SCALE, (255, 255, 255), 1,
                    cv2.LINE_AA)


def annotate(image: np.ndarray, labels: np.ndarray, data_config, opacity: float,
             status: list[str]) -> np.ndarray:
    """RGB frame -> RGB frame with overlay, legend and status panel."""
    annotated = overlay(image, labels, data_config.palette, opacity)
    draw_legend(annotated, classes_present(labels), data_config.class_names, data_config.palette)
    draw_status(annotated, status)
    return annotated
