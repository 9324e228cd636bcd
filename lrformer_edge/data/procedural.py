"""Procedural street scenes with pixel-exact labels, deterministic by seed.

No dataset can be downloaded where this toolkit is tested, yet every accuracy figure it reports
needs labelled images. The generator draws a scene description (horizon, road in perspective,
buildings, vegetation, water, vehicles, people, poles, signs, fences) into an RGB image and a
label map at once, so labels are exact at any resolution. What makes it non-trivial:

* textures, lighting and colour-temperature changes, sensor noise and blur;
* perspective: objects shrink towards the horizon, so they appear at many scales;
* occlusion: objects are painted far-to-near;
* context: water mirrors the sky's colours, so only its place below the horizon tells it apart.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lrformer_edge.data.classes import PROCEDURAL_CLASSES, PROCEDURAL_PALETTE
from lrformer_edge.progress import track

C = {name: index for index, name in enumerate(PROCEDURAL_CLASSES)}

# Cityscapes label ids for the Cityscapes-layout writer (water has no Cityscapes class: 0).
CITYSCAPES_LABEL_IDS = {
    "sky": 23, "road": 7, "sidewalk": 8, "building": 11, "vegetation": 21, "terrain": 22,
    "water": 0, "vehicle": 26, "person": 24, "pole": 17, "fence": 13, "sign": 20,
}


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # H x W x 3 uint8 RGB
    label: np.ndarray  # H x W uint8 class indices into PROCEDURAL_CLASSES


class _Canvas:
    """Paints image and label together; later paint occludes earlier."""

    def __init__(self, height: int, width: int, rng: np.random.Generator):
        self.h, self.w, self.rng = height, width, rng
        self.image = np.zeros((height, width, 3), np.float32)
        self.label = np.zeros((height, width), np.uint8)
        # One fine-grain field per scene, reused by every texture: drawing it per region
        # dominated generation time.
        self._grain = rng.normal(0, 0.35, (height, width)).astype(np.float32)

    def texture(self, colour, amplitude: float, scale: float) -> np.ndarray:
        """Colour field modulated by smooth noise at ``scale`` (fraction of the image)."""
        cells = max(2, int(1.0 / max(scale, 1e-3)))
        coarse = self.rng.normal(0, 1, (cells, cells)).astype(np.float32)
        noise = cv2.resize(coarse, (self.w, self.h), interpolation=cv2.INTER_CUBIC)
        field = (noise + self._grain)[..., None] * amplitude
        return np.clip(np.asarray(colour, np.float32)[None, None] + field, 0, 255)

    def fill(self, mask: np.ndarray, cls: int, pixels: np.ndarray) -> None:
        self.image[mask] = pixels[mask] if pixels.ndim == 3 else pixels
        self.label[mask] = cls

    def poly(self, points, cls: int, colour, amplitude: float = 8.0, scale: float = 0.1) -> None:
        mask = np.zeros((self.h, self.w), np.uint8)
        cv2.fillPoly(mask, [np.asarray(points, np.int32)], 1)
        self.fill(mask.astype(bool), cls, self.texture(colour, amplitude, scale))

    def shape_mask(self, draw) -> np.ndarray:
        mask = np.zeros((self.h, self.w), np.uint8)
        draw(mask)
        return mask.astype(bool)


def _jitter(rng, colour, amount: float):
    return np.clip(np.asarray(colour, np.float32) + rng.normal(0, amount, 3), 0, 255)


def _sky_gradient(canvas: _Canvas, horizon: int, top, bottom) -> np.ndarray:
    rows = np.linspace(0, 1, canvas.h, dtype=np.float32)[:, None, None]
    scaled = np.clip(rows * canvas.h / max(horizon, 1), 0, 1)
    gradient = np.asarray(top, np.float32) * (1 - scaled) + np.asarray(bottom, np.float32) * scaled
    return np.broadcast_to(gradient, (canvas.h, canvas.w, 3)).copy()


MIN_SCENE_SIDE = 32


def check_scene_size(size) -> tuple[int, int]:
    """(height, width) of a scene: both at least MIN_SCENE_SIDE pixels."""
    height, width = (int(v) for v in size)
    if height < MIN_SCENE_SIDE or width < MIN_SCENE_SIDE:
        raise ValueError(f"scene size must be at least {MIN_SCENE_SIDE}x{MIN_SCENE_SIDE} "
                         f"(height x width), got {height}x{width}")
    return height, width


def generate_scene(seed: int, height: int = 512, width: int = 512) -> Scene:
    """One labelled street scene; the same seed and size always give the same scene."""
    check_scene_size((height, width))
    rng = np.random.default_rng(seed)
    cv = _Canvas(height, width, rng)
    h, w = height, width
    horizon = int(h * rng.uniform(0.32, 0.55))
    vanish_x = w * rng.uniform(0.3, 0.7)

    sky_top = _jitter(rng, (90, 140, 215), 25)
    sky_bottom = _jitter(rng, (185, 210, 235), 20)
    sky = _sky_gradient(cv, horizon, sky_top, sky_bottom)
    clouds = np.clip(cv.texture((0, 0, 0), 40, 0.15)[..., :1] - 25, 0, 60)
    cv.fill(np.ones((h, w), bool), C["sky"], np.clip(sky + clouds, 0, 255))

    _draw_ground(cv, rng, horizon, vanish_x, sky)
    _draw_skyline(cv, rng, horizon)
    objects = _draw_objects(cv, rng, horizon, vanish_x)
    del objects
    image = _camera_effects(cv.image, rng)
    return Scene(image, cv.label.copy())


def _draw_ground(cv: _Canvas, rng, horizon: int, vanish_x: float, sky: np.ndarray) -> None:
    h, w = cv.h, cv.w
    ground = [(0, horizon), (w, horizon), (w, h), (0, h)]
    cv.poly(ground, C["terrain"], _jitter(rng, (105, 135, 60), 18), amplitude=18, scale=0.05)

    road_half = w * rng.uniform(0.28, 0.55)
    walk = w * rng.uniform(0.08, 0.2)
    top_half = max(2.0, w * 0.01)
    left_road = [(vanish_x - top_half, horizon), (vanish_x - road_half, h)]
    right_road = [(vanish_x + top_half, horizon), (vanish_x + road_half, h)]
    sidewalk_left = [(vanish_x - top_half * 1.6, horizon), left_road[0], left_road[1],
                     (vanish_x - road_half - walk, h)]
    sidewalk_right = [right_road[0], (vanish_x + top_half * 1.6, horizon),
                      (vanish_x + road_half + walk, h), right_road[1]]
    cv.poly(sidewalk_left, C["sidewalk"], _jitter(rng, (190, 180, 175), 12), 10, 0.02)
    cv.poly(sidewalk_right, C["sidewalk"], _jitter(rng, (190, 180, 175), 12), 10, 0.02)
    cv.poly([left_road[0], right_road[0], right_road[1], left_road[1]], C["road"],
            _jitter(rng, (95, 95, 100), 12), 7, 0.1)
    # Lane markings belong to the road class: paint colour only.
    for t0 in np.arange(0.05, 1.0, 0.12):
        t1 = t0 + 0.05
        y0, y1 = horizon + (h - horizon) * t0 ** 2, horizon + (h - horizon) * t1 ** 2
        half0, half1 = max(1, w * 0.004 * t0 * 3), max(1, w * 0.004 * t1 * 3)
        mark = np.array([(vanish_x - half0, y0), (vanish_x + half0, y0),
                         (vanish_x + half1, y1), (vanish_x - half1, y1)], np.int32)
        cv2.fillPoly(cv.image, [mark], (235, 235, 225))

    if rng.random() < 0.6:  # a lake that mirrors the sky: only context separates them
        side = rng.choice([-1, 1])
        x_edge = vanish_x + side * (road_half + walk) * rng.uniform(1.05, 1.4)
        far = horizon + (h - horizon) * rng.uniform(0.0, 0.05)
        depth = horizon + (h - horizon) * rng.uniform(0.45, 0.9)
        x_out = 0 if side < 0 else w
        pts = [(x_out, far), (vanish_x + side * (road_half * 0.35), far), (x_edge, depth),
               (x_out, depth)]
        mask = cv.shape_mask(lambda m: cv2.fillPoly(m, [np.asarray(pts, np.int32)], 1))
        mirrored = sky[::-1][(h - 2 * horizon) % h:][:h] if 2 * horizon <= h else sky[::-1]
        mirrored = np.resize(mirrored, (h, w, 3))
        ripples = cv.texture((0, 0, 0), 6, 0.3)
        cv.fill(mask, C["water"], np.clip(mirrored + ripples, 0, 255))

    if rng.random() < 0.6:
        side = rng.choice([-1, 1])
        y_fence = horizon + (h - horizon) * rng.uniform(0.05, 0.3)
        height = (y_fence - horizon) * 0.25 + h * 0.02
        x_start = vanish_x + side * (road_half * 0.5 + walk)
        x_end = 0 if side < 0 else w
        colour = _jitter(rng, (140, 110, 80), 20)
        lo, hi = sorted((x_start, x_end))
        mask = cv.shape_mask(lambda m: _fence(m, lo, hi, y_fence, height))
        cv.fill(mask, C["fence"], cv.texture(colour, 10, 0.2))


def _fence(mask, lo, hi, base_y, height) -> None:
    step = max(4, int(height * 0.6))
    thick = max(2, int(height * 0.12))
    for x in range(int(lo), int(hi), step):
        cv2.rectangle(mask, (x, int(base_y - height)), (x + thick, int(base_y)), 1, -1)
    for frac in (0.2, 0.65):
        y = int(base_y - height * frac)
        cv2.rectangle(mask, (int(lo), y), (int(hi), y + thick), 1, -1)


def _draw_skyline(cv: _Canvas, rng, horizon: int) -> None:
    h, w = cv.h, cv.w
    x = -rng.uniform(0, w * 0.1)
    while x < w:
        width = w * rng.uniform(0.06, 0.2)
        if rng.random() < 0.3:  # gaps show the sky
            x += width * rng.uniform(0.3, 1.0)
            continue
        top = horizon - h * rng.uniform(0.08, 0.4)
        if rng.random() < 0.35:
            _draw_tree(cv, rng, x + width / 2, horizon + 2, width * 0.6, horizon - top)
        else:
            colour = _jitter(rng, rng.choice([(150, 140, 130), (120, 90, 80), (170, 165, 150),
                                              (90, 100, 120)]), 15)
            x0, x1, y0, y1 = int(x), int(x + width), int(top), int(horizon + 2)
            cv.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], C["building"], colour, 6, 0.3)
            win = max(3, int(width / rng.integers(3, 7)))
            glass = _jitter(rng, (60, 80, 110), 20)
            for wy in range(y0 + win // 2, y1 - win, win):
                for wx in range(x0 + win // 3, x1 - win // 2, win):
                    cv2.rectangle(cv.image, (wx, wy), (wx + win // 2, wy + win // 2),
                                  glass.tolist(), -1)
        x += width


def _draw_tree(cv: _Canvas, rng, cx: float, base: float, width: float, height: float) -> None:
    colour = _jitter(rng, (50, 95, 40), 15)
    trunk_w = max(2, int(width * 0.08))
    crown = cv.shape_mask(lambda m: [
        cv2.ellipse(m, (int(cx + dx * width * 0.3), int(base - height * (0.6 + dy * 0.2))),
                    (max(2, int(width * rng.uniform(0.25, 0.45))),
                     max(2, int(height * rng.uniform(0.2, 0.35)))), 0, 0, 360, 1, -1)
        for dx, dy in rng.uniform(-1, 1, (5, 2))])
    trunk = cv.shape_mask(lambda m: cv2.rectangle(
        m, (int(cx - trunk_w / 2), int(base - height * 0.45)), (int(cx + trunk_w / 2), int(base)),
        1, -1))
    cv.fill(trunk, C["vegetation"], cv.texture((80, 60, 40), 8, 0.2))
    cv.fill(crown, C["vegetation"], cv.texture(colour, 30, 0.02))


def _draw_objects(cv: _Canvas, rng, horizon: int, vanish_x: float) -> int:
    """Vehicles, people, poles with signs and roadside trees, painted far to near."""
    h, w = cv.h, cv.w
    items = []
    for _ in range(rng.integers(1, 6)):
        items.append(("vehicle", rng.uniform(0.08, 1.0), rng.uniform(-0.6, 0.6)))
    for _ in range(rng.integers(0, 6)):
        items.append(("person", rng.uniform(0.1, 1.0), rng.choice([-1, 1]) * rng.uniform(0.75, 1.1)))
    for _ in range(rng.integers(0, 4)):
        items.append(("pole", rng.uniform(0.15, 1.0), rng.choice([-1, 1]) * rng.uniform(0.9, 1.15)))
    for _ in range(rng.integers(0, 3)):
        items.append(("tree", rng.uniform(0.1, 0.9), rng.choice([-1, 1]) * rng.uniform(1.25, 1.8)))
    items.sort(key=lambda item: item[1])  # far (small depth) first
    road_half = w * 0.42
    for kind, depth, lateral in items:
        scale = depth ** 1.3  # 0 at the horizon, 1 at the bottom of the image
        base_y = horizon + (h - horizon) * depth
        cx = vanish_x + lateral * road_half * scale
        size = h * 0.5 * scale
        if size < 4:
            continue
        if kind == "vehicle":
            _vehicle(cv, rng, cx, base_y, size)
        elif kind == "person":
            _person(cv, rng, cx, base_y, size * 0.9)
        elif kind == "pole":
            _pole(cv, rng, cx, base_y, size * 1.6)
        else:
            _draw_tree(cv, rng, cx, base_y, size * 0.9, size * 1.8)
    return len(items)


def _vehicle(cv: _Canvas, rng, cx, base_y, size) -> None:
    width, height = size * rng.uniform(0.9, 1.4), size * rng.uniform(0.45, 0.7)
    colour = _jitter(rng, rng.choice([(200, 30, 30), (30, 60, 160), (230, 230, 230),
                                      (20, 20, 25), (200, 170, 40)]), 20)
    x0, x1 = cx - width / 2, cx + width / 2
    y0, y1 = base_y - height, base_y - height * 0.1
    body = cv.shape_mask(lambda m: cv2.rectangle(m, (int(x0), int(y0 + height * 0.35)),
                                                 (int(x1), int(y1)), 1, -1))
    cabin = cv.shape_mask(lambda m: cv2.rectangle(
        m, (int(x0 + width * 0.18), int(y0)), (int(x1 - width * 0.18), int(y0 + height * 0.4)),
        1, -1))
    wheels = cv.shape_mask(lambda m: [cv2.circle(m, (int(x), int(base_y - height * 0.12)),
                                                 max(1, int(height * 0.17)), 1, -1)
                                      for x in (x0 + width * 0.2, x1 - width * 0.2)])
    cv.fill(body | cabin, C["vehicle"], cv.texture(colour, 6, 0.5))
    cv.fill(cabin & ~body, C["vehicle"], cv.texture((70, 90, 110), 8, 0.5))
    cv.fill(wheels, C["vehicle"], cv.texture((25, 25, 25), 4, 0.5))


def _person(cv: _Canvas, rng, cx, base_y, size) -> None:
    height = size * rng.uniform(0.9, 1.2)
    width = height * 0.28
    shirt = _jitter(rng, rng.choice([(200, 40, 40), (40, 120, 60), (240, 200, 60),
                                     (60, 60, 160), (230, 230, 230)]), 25)
    trousers = _jitter(rng, (40, 45, 70), 15)
    skin = _jitter(rng, rng.choice([(225, 180, 150), (150, 100, 70), (95, 65, 45)]), 10)
    head_r = max(1, int(height * 0.09))
    legs = cv.shape_mask(lambda m: cv2.rectangle(
        m, (int(cx - width * 0.4), int(base_y - height * 0.48)), (int(cx + width * 0.4),
                                                                    int(base_y)), 1, -1))
    torso = cv.shape_mask(lambda m: cv2.rectangle(
        m, (int(cx - width / 2), int(base_y - height * 0.8)), (int(cx + width / 2),
                                                                int(base_y - height * 0.45)), 1, -1))
    head = cv.shape_mask(lambda m: cv2.circle(
        m, (int(cx), int(base_y - height * 0.8 - head_r)), head_r, 1, -1))
    cv.fill(legs, C["person"], cv.texture(trousers, 5, 0.5))
    cv.fill(torso, C["person"], cv.texture(shirt, 8, 0.5))
    cv.fill(head, C["person"], cv.texture(skin, 4, 0.5))


def _pole(cv: _Canvas, rng, cx, base_y, height) -> None:
    thick = max(2, int(height * 0.035))
    top = base_y - height
    pole = cv.shape_mask(lambda m: cv2.rectangle(
        m, (int(cx - thick / 2), int(top)), (int(cx + thick / 2), int(base_y)), 1, -1))
    cv.fill(pole, C["pole"], cv.texture(_jitter(rng, (130, 130, 135), 10), 5, 0.5))
    if rng.random() < 0.8:
        side = max(3, int(height * 0.13))
        colour = _jitter(rng, rng.choice([(230, 200, 20), (200, 30, 30), (30, 80, 200)]), 10)
        sign = cv.shape_mask(lambda m: cv2.rectangle(
            m, (int(cx - side / 2), int(top)), (int(cx + side / 2), int(top + side)), 1, -1)
            if rng.random() < 0.5 else cv2.circle(m, (int(cx), int(top + side / 2)), side // 2,
                                                   1, -1))
        cv.fill(sign, C["sign"], cv.texture(colour, 5, 0.5))


def _camera_effects(image: np.ndarray, rng) -> np.ndarray:
    """Exposure, colour temperature, blur and sensor noise, as a real camera adds them."""
    gain = rng.uniform(0.7, 1.25)
    temperature = np.array([rng.uniform(0.9, 1.1), 1.0, rng.uniform(0.9, 1.1)], np.float32)
    image = image * gain * temperature + rng.uniform(-15, 15)
    if rng.random() < 0.5:
        sigma = rng.uniform(0.3, 1.2)
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    image = image + rng.normal(0, rng.uniform(1, 6), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def dataset_meta() -> dict:
    return {"name": "procedural", "classes": list(PROCEDURAL_CLASSES),
            "palette": [list(c) for c in PROCEDURAL_PALETTE]}


def _write_ade20k_sample(job) -> None:
    root, split, seed, size, jpeg_quality = job
    scene = generate_scene(seed, *size)
    stem = f"procedural_{seed:08d}"
    cv2.imwrite(str(root / "images" / split / f"{stem}.jpg"),
                cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    cv2.imwrite(str(root / "annotations" / split / f"{stem}.png"), scene.label + 1)


def _run_jobs(function, jobs: list, workers: int) -> None:
    if workers <= 1 or len(jobs) < 8:
        for job in track(jobs, what="scenes", label="writing scenes"):
            function(job)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        for _ in track(pool.map(function, jobs, chunksize=8), len(jobs), "scenes",
                       f"writing scenes ({workers} processes)"):
            pass


def write_ade20k_layout(root: str | Path, seeds_by_split: dict[str, range],
                        size: tuple[int, int] = (512, 512), jpeg_quality: int = 95,
                        workers: int = 1) -> Path:
    """``images/{split}/*.jpg`` + ``annotations/{split}/*.png`` (0 = unlabelled, class k -> k+1).

    The +1 follows ADE20K's convention, which readers undo with the reduce-zero-label rule.
    """
    root = Path(root)
    size = check_scene_size(size)  # before any folder is made
    jobs = []
    for split, seeds in seeds_by_split.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        jobs += [(root, split, seed, tuple(size), jpeg_quality) for seed in seeds]
    _run_jobs(_write_ade20k_sample, jobs, workers)
    meta = dataset_meta() | {"layout": "ade20k", "reduce_zero_label": True,
                             "splits": {s: [r.start, r.stop] for s, r in seeds_by_split.items()},
                             "size": list(size)}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def write_cityscapes_layout(root: str | Path, seeds_by_split: dict[str, range],
                            size: tuple[int, int] = (1024, 2048), city: str = "procedural") -> Path:
    """``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``."""
    root = Path(root)
    size = check_scene_size(size)  # before any folder is made
    lut = np.zeros(256, np.uint8)
    for name, label_id in CITYSCAPES_LABEL_IDS.items():
        lut[C[name]] = label_id
    for split, seeds in seeds_by_split.items():
        images = root / "leftImg8bit" / split / city
        labels = root / "gtFine" / split / city
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for index, seed in enumerate(track(seeds, what="scenes", label=f"writing {split}")):
            scene = generate_scene(seed, *size)
            stem = f"{city}_{index:06d}_{seed:06d}"
            cv2.imwrite(str(images / f"{stem}_leftImg8bit.png"),
                        cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(labels / f"{stem}_gtFine_labelIds.png"), lut[scene.label])
    meta = dataset_meta() | {"layout": "cityscapes", "label_ids": CITYSCAPES_LABEL_IDS}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def write_procedural_video(path: str | Path, frames: int, height: int = 360, width: int = 640,
                           fps: float = 10.0, first_seed: int = 20_000_000) -> list[int]:
    """A video of ``frames`` held-out scenes (one per frame) for demos without a camera.

    Returns the seeds; ``generate_scene(seed, height, width).label`` is each frame's ground truth.
    ``.avi`` is written with MJPG, ``.mp4`` with mp4v.
    """
    from lrformer_edge.files import atomic_write

    path = Path(path)
    if path.suffix not in (".mp4", ".avi"):
        raise ValueError(f"video path must end in .mp4 or .avi, got {path}")
    seeds = list(range(first_seed, first_seed + frames))

    def write(temp):
        fourcc = cv2.VideoWriter_fourcc(*("mp4v" if path.suffix == ".mp4" else "MJPG"))
        writer = cv2.VideoWriter(str(temp), fourcc, fps, (width, height))
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot write {path.suffix} video on this machine")
        for seed in seeds:
            writer.write(cv2.cvtColor(generate_scene(seed, height, width).image, cv2.COLOR_RGB2BGR))
        writer.release()

    # OpenCV picks the container from the file name, so the temporary name keeps the suffix.
    atomic_write(path, write, suffix=path.suffix)
    return seeds
