"""Calibration sets for post-training quantization and QAT: seeded, stratified, hashed.

Sources: a dataset root in any supported layout (its training split), a plain folder of images,
a video file (.mp4/.avi/.mov/.mkv), or ``procedural`` (scenes generated from training seeds).
Sampling is stratified so a set covers the whole source: images are drawn round-robin across
sub-folders (e.g. Cityscapes cities), video frames one per equal segment of the video. The
set's SHA-256 over the exact preprocessed tensors is recorded in every artifact made with it.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrformer_edge.data.datasets import (
    IMAGE_SUFFIXES,
    DatasetError,
    open_dataset,
    read_image,
)
from lrformer_edge.files import atomic_write, cache_dir, file_sha256
from lrformer_edge.preprocess import preprocess
from lrformer_edge.progress import track

PROCEDURAL = "procedural"
# Every INT8 path (OpenVINO, TensorRT Q/DQ, Core ML W8A8, ExecuTorch) calibrates on this many
# images unless told otherwise. Measured on LRFormer-T at 512x512 (100 held-out scenes, README):
# the OpenVINO INT8 IR from 32 images is within 0.05 points of the one from 300 in mIoU and pixel
# agreement, at a ninth of the statistics time (about 1 s per image on 2 cores).
DEFAULT_CALIBRATION_IMAGES = 32
# The PTQ start of QAT keeps its own count: NNCF's torch backend keeps statistics per image in
# memory, about 130 MiB per 512x512 image and process; 64 fit a torchrun process.
QAT_CALIBRATION_IMAGES = 64
_log = logging.getLogger(__name__)


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


VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def stratified_choice(groups: dict[str, list], count: int, rng) -> list:
    """Up to ``count`` items, drawn round-robin over shuffled groups (each group shuffled)."""
    pools = [list(np.asarray(items, dtype=object)[rng.permutation(len(items))])
             for _, items in sorted(groups.items()) if items]
    order = rng.permutation(len(pools))
    chosen = []
    while len(chosen) < count and any(pools):
        for index in order:
            if pools[index] and len(chosen) < count:
                chosen.append(pools[index].pop())
    return chosen


def _video_frames(path: Path, count: int, seed: int):
    import cv2

    capture = cv2.VideoCapture(str(path))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    if not capture.isOpened() or total < 1:
        raise DatasetError(f"cannot read video {path} (or it has no frames)")
    rng = np.random.default_rng(seed)
    segments = np.linspace(0, total, min(count, total) + 1)
    wanted = sorted({int(rng.integers(int(a), max(int(a) + 1, int(b))))
                     for a, b in zip(segments[:-1], segments[1:])})
    for index in wanted:
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame = capture.read()
        if ok:
            yield f"{path.stem}_frame{index:06d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    capture.release()


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
                           f"image folder, a video file, or '{PROCEDURAL}'")
    if root.is_file():
        if root.suffix.lower() not in VIDEO_SUFFIXES:
            raise DatasetError(f"calibration source {root} is a file but not a video "
                               f"({', '.join(VIDEO_SUFFIXES)})")
        yield from _video_frames(root, count, seed)
        return
    for path in _chosen_images(root, count, seed):
        yield path.name, read_image(path)


def _chosen_images(root: Path, count: int, seed: int) -> list[Path]:
    """The image files of a folder source a set of ``count`` draws, in a fixed order."""
    try:
        dataset = open_dataset(root, "train")
        paths = [image for image, _ in dataset.pairs]
    except DatasetError:
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"no images found under {root}")
    groups: dict[str, list] = {}
    for path in paths:
        groups.setdefault(str(path.parent), []).append(path)
    return sorted(stratified_choice(groups, count, np.random.default_rng(seed)))


def check_calibration_source(source: str, count: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0) -> None:
    """Fail now, not after minutes of exports, if ``source`` cannot give a calibration set:
    a missing source, a file that is not a video, no images, or an image that does not decode
    (the images the set would draw are decoded once here)."""
    if count < 1:
        raise ValueError(f"a calibration set needs at least one image, got count={count}")
    if str(source) == PROCEDURAL:
        return
    root = Path(source)
    if root.is_dir():
        for path in track(_chosen_images(root, count, seed), what="images",
                          label=f"checking the calibration images of {root}"):
            read_image(path)
    else:
        next(iter(_images_from(str(source), 1, seed)), None)  # existence, video readability


def build_calibration_set(source: str, data_config, input_size, count: int = DEFAULT_CALIBRATION_IMAGES,
                          seed: int = 0) -> CalibrationSet:
    """``count`` images from ``source``, preprocessed to the artifact's fixed ``input_size``."""
    if count < 1:
        raise ValueError(f"a calibration set needs at least one image, got count={count}")
    names, batches = [], []
    images = _procedural_scenes(count, seed) if str(source) == PROCEDURAL else \
        track(_images_from(str(source), count, seed), total=count, what="images",
              label=f"calibration set from {source}")
    for name, image in images:
        names.append(name)
        batches.append(preprocess(image, data_config.mean, data_config.std,
                                  input_size=tuple(input_size)).batch)
    if len(batches) < count:  # a small set calibrates worse: say so instead of carrying on silently
        _log.warning(f"warning: calibration source {source} gave {len(batches)} images, "
                     f"{count} were asked for; calibrating with {len(batches)}")
    return CalibrationSet(batches, str(source), seed, names)


def _procedural_scenes(count: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """The procedural calibration scenes, generated once (0.4 s each at 512x512) and kept under
    ``files.cache_dir()``: every INT8 export of every target calibrates on the same scenes. The
    file is named after the count, the seed and the generator's own source, so a changed
    generator never serves old scenes."""
    import lrformer_edge.data.procedural as generator

    recipe = f"{count}-{seed}-{file_sha256(generator.__file__)[:16]}"
    path = cache_dir() / "calibration" / f"procedural-{recipe}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                scenes = list(zip(archive["names"].tolist(), archive["images"]))
            _log.info(f"calibration set from {PROCEDURAL}: {count} scenes read from {path}")
            return scenes
        except (OSError, ValueError, KeyError):
            pass  # unreadable: generate again and replace it
    scenes = list(track(_images_from(PROCEDURAL, count, seed), total=count, what="images",
                        label=f"calibration set from {PROCEDURAL}"))
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, names=np.array([name for name, _ in scenes]),
                     images=np.stack([image for _, image in scenes]))

    atomic_write(path, save, suffix=".npz")
    return scenes
