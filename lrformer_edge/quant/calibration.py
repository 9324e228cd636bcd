"""Calibration sets for post-training quantization: seeded, hashed, from real images.

Sources: a dataset root in any supported layout (its training split), a plain folder of images,
or ``procedural`` (scenes generated from training seeds). The set's SHA-256 over the exact
preprocessed tensors is recorded in every artifact quantized with it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrformer_edge.data.datasets import IMAGE_SUFFIXES, DatasetError, open_dataset, read_image
from lrformer_edge.data.preprocess import preprocess

PROCEDURAL = "procedural"


@dataclass
class CalibrationSet:
    batches: list[np.ndarray]  # each (1, 3, H, W) float32, preprocessed like inference
    source: str
    seed: int
    names: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for batch in self.batches:
            digest.update(np.ascontiguousarray(batch).tobytes())
        return digest.hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "images": len(self.batches), "seed": self.seed,
                "sha256": self.sha256}


def _images_from(source: str, count: int, seed: int):
    if source == PROCEDURAL:
        from lrformer_edge.data.procedural import generate_scene

        rng = np.random.default_rng(seed)
        for scene_seed in rng.choice(1_000_000, size=count, replace=False):
            yield f"procedural_{int(scene_seed):08d}", generate_scene(int(scene_seed)).image
        return
    root = Path(source)
    if not root.exists():
        raise DatasetError(f"calibration source {root} does not exist; give a dataset root, an "
                           f"image folder, or '{PROCEDURAL}'")
    try:
        dataset = open_dataset(root, "train")
        paths = [image for image, _ in dataset.pairs]
    except DatasetError:
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"no images found under {root}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(count, len(paths)), replace=False)
    for index in sorted(chosen):
        yield paths[index].name, read_image(paths[index])


def build_calibration_set(source: str, data_config, input_size, count: int = 300,
                          seed: int = 0) -> CalibrationSet:
    """``count`` images from ``source``, preprocessed to the artifact's fixed ``input_size``."""
    if count < 1:
        raise ValueError(f"a calibration set needs at least one image, got count={count}")
    names, batches = [], []
    for name, image in _images_from(str(source), count, seed):
        names.append(name)
        batches.append(preprocess(image, data_config.mean, data_config.std,
                                  input_size=tuple(input_size)).batch)
    return CalibrationSet(batches, str(source), seed, names)
