"""Readers for the on-disk formats users have: ADE20K, Cityscapes, COCO-Stuff, folder pairs.

Every reader yields ``Sample(image RGB uint8 HxWx3, label uint8 HxW, name)`` with labels already
in train ids (0..num_classes-1, ``ignore_index`` elsewhere). A file that cannot be read, or an
image whose mask has another size, raises ``DatasetError`` naming the file, or is skipped with a
warning when the reader was built with ``skip_bad=True``.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset that is missing, empty, or has an unreadable or inconsistent file."""


@dataclass
class Sample:
    image: np.ndarray
    label: np.ndarray
    name: str


def read_image(path: str | Path) -> np.ndarray:
    """An RGB uint8 image; raises DatasetError naming the file when it cannot be decoded."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if image is None:
        raise DatasetError(f"cannot read image {path}: missing, empty or not an image file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """A single-channel label image (palette PNGs give their indices, not their colours)."""
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(
                    f"mask {path} has mode {mask.mode}; expected a single-channel label image "
                    f"(grayscale or palette PNG holding class ids)")
            return np.asarray(mask).astype(np.int64)
    except (OSError, UnidentifiedImageError) as error:
        raise DatasetError(f"cannot read mask {path}: {error}") from None


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K rule: 0 ("other") becomes ignore, every other id k becomes k-1."""
    reduced = label.astype(np.int64) - 1
    reduced[label == 0] = IGNORE_INDEX
    reduced[label == IGNORE_INDEX] = IGNORE_INDEX
    return reduced


class SegmentationDataset:
    """Image/mask pairs with a label transform; subclasses only find the pairs."""

    label_transform = None

    def __init__(self, pairs: list[tuple[Path, Path]], class_names: tuple[str, ...] | None = None,
                 skip_bad: bool = False, source: str = "", palette=None):
        if not pairs:
            raise DatasetError(f"no image/mask pairs found in {source or 'the dataset'}")
        self.pairs = pairs
        self.class_names = class_names
        self.palette = palette
        self.skip_bad = skip_bad
        self.source = source

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> Sample:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        label = read_mask(mask_path)
        if image.shape[:2] != label.shape[:2]:
            raise DatasetError(
                f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} but "
                f"mask {mask_path} is {label.shape[1]}x{label.shape[0]} (width x height)")
        if self.label_transform is not None:
            label = self.label_transform(label)
        label = np.where((label < 0) | (label > 255), IGNORE_INDEX, label).astype(np.uint8)
        return Sample(image, label, image_path.stem)

    def __getitem__(self, index: int) -> Sample:
        return self.load(index)

    def __iter__(self):
        for index in range(len(self)):
            try:
                yield self.load(index)
            except DatasetError as error:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping sample: {error}", stacklevel=2)


def _pairs(image_dir: Path, mask_dir: Path, mask_name) -> list[tuple[Path, Path]]:
    if not image_dir.is_dir():
        raise DatasetError(f"image folder {image_dir} does not exist")
    if not mask_dir.is_dir():
        raise DatasetError(f"mask folder {mask_dir} does not exist")
    pairs, orphans = [], []
    for image in sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        name = mask_name(image.relative_to(image_dir))
        if name is None:
            continue
        mask = mask_dir / name
        (pairs if mask.is_file() else orphans).append((image, mask))
    if orphans:
        image, mask = orphans[0]
        raise DatasetError(f"{len(orphans)} images have no mask, e.g. {image} (expected {mask})")
    return pairs


def _meta_classes(root: Path) -> tuple[tuple[str, ...] | None, tuple | None]:
    """Class names and palette from the ``dataset.json`` our generator writes, if present."""
    meta = root / "dataset.json"
    if not meta.is_file():
        return None, None
    content = json.loads(meta.read_text())
    palette = content.get("palette")
    return tuple(content["classes"]), tuple(map(tuple, palette)) if palette else None


class ADE20KDataset(SegmentationDataset):
    """``images/{split}/*.jpg`` + ``annotations/{split}/*.png``; 0 is "other" (ignored)."""

    def __init__(self, root: str | Path, split: str = "validation", reduce_zero: bool = True,
                 skip_bad: bool = False):
        root = Path(root)
        pairs = _pairs(root / "images" / split, root / "annotations" / split,
                       lambda rel: rel.with_suffix(".png"))
        self.label_transform = reduce_zero_label if reduce_zero else None
        names, palette = _meta_classes(root)
        super().__init__(pairs, names, skip_bad, f"{root} ({split})", palette)


# Cityscapes label id -> train id (the 19 evaluated classes); everything else is ignored.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
_CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, np.int64)
for _label_id, _train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
    _CITYSCAPES_LUT[_label_id] = _train_id


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
    return _CITYSCAPES_LUT[np.clip(label_ids, 0, 255)]


class CityscapesDataset(SegmentationDataset):
    """``leftImg8bit/{split}/*/*_leftImg8bit.png`` + ``gtFine/{split}/*/*_gtFine_labelIds.png``."""

    label_transform = staticmethod(cityscapes_train_ids)

    def __init__(self, root: str | Path, split: str = "val", skip_bad: bool = False):
        root = Path(root)

        def mask_name(rel: Path):
            if not rel.name.endswith("_leftImg8bit.png"):
                return None
            return rel.parent / rel.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")

        from lrformer_edge.data.classes import CITYSCAPES_CLASSES

        pairs = _pairs(root / "leftImg8bit" / split, root / "gtFine" / split, mask_name)
        super().__init__(pairs, CITYSCAPES_CLASSES, skip_bad, f"{root} ({split})")


class COCOStuffDataset(SegmentationDataset):
    """COCO-Stuff 164k as mmseg converts it: ``images/{split}/*.jpg`` +
    ``annotations/{split}/*_labelTrainIds.png`` (ids 0..170, 255 ignored)."""

    def __init__(self, root: str | Path, split: str = "val2017", skip_bad: bool = False):
        root = Path(root)
        from lrformer_edge.data.classes import COCO_STUFF_CLASSES

        pairs = _pairs(root / "images" / split, root / "annotations" / split,
                       lambda rel: rel.parent / f"{rel.stem}_labelTrainIds.png")
        super().__init__(pairs, COCO_STUFF_CLASSES, skip_bad, f"{root} ({split})")


class FolderPairDataset(SegmentationDataset):
    """Any ``images/`` folder with a ``masks/`` folder of same-stem PNGs holding train ids."""

    def __init__(self, image_dir: str | Path, mask_dir: str | Path, mask_suffix: str = ".png",
                 class_names: tuple[str, ...] | None = None, skip_bad: bool = False):
        pairs = _pairs(Path(image_dir), Path(mask_dir),
                       lambda rel: rel.parent / f"{rel.stem}{mask_suffix}")
        super().__init__(pairs, class_names, skip_bad, f"{image_dir} + {mask_dir}")


DATASET_FORMATS = {
    "ade20k": (ADE20KDataset, {"train": "training", "val": "validation"}),
    "cityscapes": (CityscapesDataset, {"train": "train", "val": "val"}),
    "coco-stuff": (COCOStuffDataset, {"train": "train2017", "val": "val2017"}),
}


def detect_format(root: str | Path) -> str:
    root = Path(root)
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if (root / "images" / "training").is_dir() or (root / "images" / "validation").is_dir():
        return "ade20k"
    if (root / "images" / "val2017").is_dir() or (root / "images" / "train2017").is_dir():
        return "coco-stuff"
    raise DatasetError(
        f"cannot tell the layout of {root}: expected ADE20K (images/training, "
        f"images/validation), Cityscapes (leftImg8bit/) or COCO-Stuff (images/train2017)")


def open_dataset(root: str | Path, split: str = "val", fmt: str | None = None,
                 skip_bad: bool = False) -> SegmentationDataset:
    """A reader for ``root`` in its (detected) layout; ``split`` is "train" or "val"."""
    if not Path(root).is_dir():
        problem = "is a file, not a folder" if Path(root).exists() else "does not exist"
        raise DatasetError(f"dataset root {root} {problem}")
    fmt = fmt or detect_format(root)
    if fmt not in DATASET_FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; known: {', '.join(DATASET_FORMATS)}")
    cls, splits = DATASET_FORMATS[fmt]
    return cls(root, splits.get(split, split), skip_bad=skip_bad)
