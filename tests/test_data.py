"""Procedural scenes and dataset readers, on small datasets the tests write themselves."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from lrformer_edge.data.datasets import (
    ADE20KDataset,
    CityscapesDataset,
    COCOStuffDataset,
    DatasetError,
    FolderPairDataset,
    open_dataset,
)
from lrformer_edge.data.procedural import (
    PROCEDURAL_CLASSES,
    C,
    generate_scene,
    write_ade20k_layout,
    write_cityscapes_layout,
)


def test_scenes_are_deterministic_and_labelled():
    a, b = generate_scene(42, 128, 160), generate_scene(42, 128, 160)
    assert (a.image == b.image).all() and (a.label == b.label).all()
    assert a.image.shape == (128, 160, 3) and a.image.dtype == np.uint8
    assert a.label.max() < len(PROCEDURAL_CLASSES)
    assert not (generate_scene(43, 128, 160).image == a.image).all()


def test_scenes_cover_at_least_ten_classes_and_large_frames():
    seen = set()
    for seed in range(12):
        seen |= set(np.unique(generate_scene(seed, 256, 256).label).tolist())
    assert len(PROCEDURAL_CLASSES) >= 10 and len(seen) >= 10, seen
    big = generate_scene(3, 1024, 2048)
    assert big.image.shape == (1024, 2048, 3) and big.label.shape == (1024, 2048)


def test_water_mirrors_the_sky_colours():
    """Sky and water overlap in colour: only context tells them apart."""
    for seed in range(40):
        scene = generate_scene(seed, 256, 256)
        water = scene.label == C["water"]
        if water.sum() > 500:
            sky = scene.image[scene.label == C["sky"]].mean(0)
            assert np.abs(scene.image[water].mean(0) - sky).max() < 60
            return
    pytest.fail("no scene with water in 40 seeds")


def test_ade20k_layout_round_trip(tmp_path):
    root = write_ade20k_layout(tmp_path / "ade", {"training": range(3), "validation": range(100, 102)},
                               size=(64, 96))
    assert json.loads((root / "dataset.json").read_text())["classes"] == list(PROCEDURAL_CLASSES)
    dataset = open_dataset(root, "val")
    assert isinstance(dataset, ADE20KDataset) and len(dataset) == 2
    sample = dataset[0]
    expected = generate_scene(100, 64, 96)
    assert sample.image.shape == (64, 96, 3)
    assert (sample.label == expected.label).all()  # reduce-zero-label undoes the +1
    assert np.abs(sample.image.astype(int) - expected.image).mean() < 6  # JPEG


def test_reduce_zero_label_rule(tmp_path):
    (tmp_path / "images" / "validation").mkdir(parents=True)
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "images" / "validation" / "a.jpg"), np.zeros((2, 3, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "annotations" / "validation" / "a.png"),
                np.array([[0, 1, 2], [150, 255, 3]], np.uint8))
    label = ADE20KDataset(tmp_path)[0].label
    np.testing.assert_array_equal(label, [[255, 0, 1], [149, 255, 2]])


def test_cityscapes_layout_maps_label_ids_to_train_ids(tmp_path):
    root = write_cityscapes_layout(tmp_path / "cs", {"train": range(1), "val": range(5, 7)},
                                   size=(64, 128))
    dataset = open_dataset(root, "val")
    assert isinstance(dataset, CityscapesDataset) and len(dataset) == 2
    sample, scene = dataset[0], generate_scene(5, 64, 128)
    assert (sample.label[scene.label == C["road"]] == 0).all()  # road -> train id 0
    assert (sample.label[scene.label == C["sky"]] == 10).all()
    assert (sample.label[scene.label == C["water"]] == 255).all()  # no Cityscapes class


def test_coco_stuff_and_folder_pairs(tmp_path):
    for split in ("val2017",):
        (tmp_path / "coco" / "images" / split).mkdir(parents=True)
        (tmp_path / "coco" / "annotations" / split).mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "coco/images/val2017/000000000139.jpg"), np.zeros((4, 5, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "coco/annotations/val2017/000000000139_labelTrainIds.png"),
                np.full((4, 5), 170, np.uint8))
    coco = open_dataset(tmp_path / "coco", "val")
    assert isinstance(coco, COCOStuffDataset) and coco[0].label.max() == 170
    assert len(coco.class_names) == 171

    (tmp_path / "imgs").mkdir()
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "x.png"), np.zeros((4, 5, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "masks" / "x_mask.png"), np.full((4, 5), 3, np.uint8))
    pairs = FolderPairDataset(tmp_path / "imgs", tmp_path / "masks", mask_suffix="_mask.png")
    assert pairs[0].label.max() == 3 and pairs[0].name == "x"


@pytest.fixture
def small_ade(tmp_path):
    return write_ade20k_layout(tmp_path / "ade", {"validation": range(3)}, size=(32, 48))


def test_corrupt_image_is_named(small_ade):
    bad = small_ade / "images" / "validation" / "procedural_00000001.jpg"
    bad.write_bytes(b"not a jpeg")
    dataset = open_dataset(small_ade, "val")
    with pytest.raises(DatasetError, match="procedural_00000001.jpg"):
        list(dataset)
    skipping = open_dataset(small_ade, "val", skip_bad=True)
    with pytest.warns(UserWarning, match="procedural_00000001.jpg"):
        assert len(list(skipping)) == 2


def test_size_mismatch_names_both_files(small_ade):
    mask = small_ade / "annotations" / "validation" / "procedural_00000002.png"
    cv2.imwrite(str(mask), np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError, match=r"procedural_00000002.jpg is 48x32 but mask .* is 10x10"):
        open_dataset(small_ade, "val")[2]


def test_missing_masks_and_unknown_layouts(small_ade, tmp_path):
    (small_ade / "annotations" / "validation" / "procedural_00000000.png").unlink()
    with pytest.raises(DatasetError, match="1 images have no mask"):
        open_dataset(small_ade, "val")
    with pytest.raises(DatasetError, match="nothing does not exist"):
        open_dataset(tmp_path / "nothing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the layout"):
        open_dataset(tmp_path / "nothing")
    rgb_mask = small_ade / "annotations" / "validation" / "procedural_00000001.png"
    cv2.imwrite(str(rgb_mask), np.zeros((32, 48, 3), np.uint8))
    cv2.imwrite(str(small_ade / "annotations" / "validation" / "procedural_00000000.png"),
                np.zeros((32, 48), np.uint8))
    with pytest.raises(DatasetError, match="single-channel"):
        open_dataset(small_ade, "val")[1]
