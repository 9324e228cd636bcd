"""Training and fine-tuning with the official recipe, on one process or many (torchrun + DDP).

Recipe (mmseg config of the release): AdamW (betas 0.9/0.999, weight decay 0.01, none on norms
and layer scales), 10x learning rate on the decode head, linear warm-up then poly decay (power 1),
gradient clipping at 35, random rescale (ratio 0.5-2.0 of the test scale), random crop with
cat_max_ratio 0.75, horizontal flip, photometric distortion, cross-entropy with ignore index 255.
Checkpoints use mmseg's layout (``{'meta', 'state_dict', 'optimizer'}``), so ours and the
official ones are interchangeable, and ``resume`` continues from the latest one exactly.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lrformer_edge.data.datasets import IGNORE_INDEX, SegmentationDataset, open_dataset
from lrformer_edge.models.checkpoint import (
    load_into,
    read_state_dict,
    save_mmseg_checkpoint,
)
from lrformer_edge.preprocess import normalize, rescale_size


@dataclass
class TrainConfig:
    variant: str
    data: str
    work_dir: str
    dataset_format: str | None = None
    checkpoint: str | None = None  # initial weights (fine-tuning)
    iters: int = 160_000
    batch_size: int = 4  # per process
    crop_size: tuple[int, int] = (512, 512)
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    warmup_start_factor: float = 1e-6
    clip_grad: float = 35.0
    drop_path_rate: float = 0.1
    scale_range: tuple[float, float] = (0.5, 2.0)
    val_interval: int = 1000
    val_max_images: int | None = None
    log_interval: int = 50
    checkpoint_interval: int = 1000
    num_workers: int = 2
    seed: int = 0
    resume: bool = False
    threads: int | None = None
    # Mixed precision: bfloat16 autocast (about 3x faster on CPUs with AMX), fp32 master weights.
    amp: bool = False
    extra_meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from lrformer_edge.models.deploy import check_input_size

        # The model takes multiples of 32 only; refuse before any data is read or folder made.
        self.crop_size = check_input_size(self.crop_size, "crop_size")


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return info


def training_device(info: DistInfo) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------- data


class AugmentedSegmentation(torch.utils.data.Dataset):
    """Random rescale, crop (cat_max_ratio 0.75), flip and photometric distortion."""

    def __init__(self, dataset: SegmentationDataset, mean, std, test_scale, crop_size,
                 scale_range, seed: int):
        self.dataset = dataset
        self.mean, self.std = mean, std
        self.test_scale = test_scale
        self.crop = tuple(crop_size)
        self.scale_range = scale_range
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        import cv2

        rng = np.random.default_rng((self.seed, self.epoch, index))
        sample = self.dataset[index]
        ratio = rng.uniform(*self.scale_range)
        scale = (int(self.test_scale[0] * ratio), int(self.test_scale[1] * ratio))
        height, width = rescale_size(*sample.image.shape[:2], scale)
        image = cv2.resize(sample.image, (width, height), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(sample.label, (width, height), interpolation=cv2.INTER_NEAREST)
        image, label = self._crop(image, label, rng)
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        image = photometric_distortion(image, rng)
        return (torch.from_numpy(normalize(image, self.mean, self.std)[0]),
                torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)))

    def _crop(self, image, label, rng):
        crop_h, crop_w = self.crop
        pad_h, pad_w = max(crop_h - image.shape[0], 0), max(crop_w - image.shape[1], 0)
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        for _ in range(10):  # mmseg RandomCrop: avoid crops that one class dominates
            y = rng.integers(0, image.shape[0] - crop_h + 1)
            x = rng.integers(0, image.shape[1] - crop_w + 1)
            cropped = label[y:y + crop_h, x:x + crop_w]
            counts = np.bincount(cropped[cropped != IGNORE_INDEX].ravel())
            if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
                break
        return image[y:y + crop_h, x:x + crop_w], label[y:y + crop_h, x:x + crop_w]


def photometric_distortion(image: np.ndarray, rng) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter, each applied with probability 1/2."""
    import cv2

    pixels = image.astype(np.float32)
    if rng.random() < 0.5:
        pixels += rng.uniform(-32, 32)
    if rng.random() < 0.5:
        pixels *= rng.uniform(0.5, 1.5)
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    if rng.random() < 0.5 or rng.random() < 0.5:
        hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV).astype(np.float32)
        if rng.random() < 0.5:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if rng.random() < 0.5:
            hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 18)) % 180
        pixels = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return pixels


# ----------------------------------------------------------------------------- optimisation


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float):
    """No decay on norms, biases of norms and layer scales; the decode head learns 10x faster."""
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = "norm" in name or "layer_scale" in name or name.endswith(".bn.weight") \
            or name.endswith(".bn.bias")
        group_lr = lr * (head_lr_mult if name.startswith("decode_head.") else 1.0)
        groups.setdefault((group_lr, 0.0 if no_decay else weight_decay), []).append(param)
    return [{"params": params, "lr": group_lr, "initial_lr": group_lr, "weight_decay": decay}
            for (group_lr, decay), params in groups.items()]


def lr_factor(iteration: int, total: int, warmup: int, start_factor: float) -> float:
    """Linear warm-up from ``start_factor``, then poly (power 1) decay to 0 (mmseg schedulers)."""
    if iteration < warmup:
        return start_factor + (1.0 - start_factor) * iteration / warmup
    return max(0.0, 1.0 - (iteration - warmup) / max(1, total - warmup))


# ----------------------------------------------------------------------------- evaluation


def evaluate(model: nn.Module, dataset: SegmentationDataset, data_config, device,
             max_images: int | None = None, info: DistInfo | None = None) -> dict:
    """Whole-image mIoU through the deploy pipeline's path; shards over processes when DDP."""
    from lrformer_edge.backends.pytorch.runner import TorchRunner
    from lrformer_edge.evaluation import confusion_of
    from lrformer_edge.pipeline import SegmentationPipeline

    info = info or DistInfo()
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    shard = (dataset[i] for i in range(info.rank, count, info.world_size))
    with SegmentationPipeline(TorchRunner(model, device=str(device)), data_config) as pipeline:
        matrix, _ = confusion_of(pipeline, shard)
    return summed_over_processes(matrix, info).compute()


def summed_over_processes(matrix, info: DistInfo):
    """The confusion matrix of every process's shard together (all-reduce under DDP)."""
    if info.world_size > 1:
        import torch.distributed as dist

        totals = torch.from_numpy(matrix.matrix)
        dist.all_reduce(totals)
        matrix.matrix = totals.numpy()
    return matrix


# ----------------------------------------------------------------------------- the loop


def _log(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(message, flush=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainConfig) -> dict:
    """Train ``config.variant`` on ``config.data``; returns the final summary (also in JSON)."""
    from lrformer_edge.models.factory import create_model

    info = init_distributed()
    device = training_device(info)
    if config.threads:
        torch.set_num_threads(config.threads)
    _seed_everything(config.seed + info.rank)
    work_dir = Path(config.work_dir)

    train_set = open_dataset(config.data, "train", config.dataset_format)
    val_set = open_dataset(config.data, "val", config.dataset_format)
    model = create_model(config.variant, checkpoint=config.checkpoint, pretrained=False,
                         drop_path_rate=config.drop_path_rate,
                         num_classes=None if config.checkpoint else
                         (len(train_set.class_names) if train_set.class_names else None))
    _check_classes(train_set, model.config.data)
    model.config = _with_dataset_classes(model.config, train_set)
    if info.is_main:  # only now: bad data or a bad checkpoint leave no empty work dir behind
        work_dir.mkdir(parents=True, exist_ok=True)
    data_config = model.config.data
    model.to(device)

    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.lr, config.weight_decay, config.head_lr_mult),
        lr=config.lr, betas=(0.9, 0.999))
    start_iter, best = 0, {"mIoU": -1.0, "iter": 0}
    latest = work_dir / "latest.pth"
    if config.resume and latest.is_file():
        start_iter, best = _resume(latest, model, optimizer)
        _log(info, f"resumed from {latest} at iteration {start_iter}")

    if info.world_size > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.type == "cuda" else None)
    else:
        wrapped = model

    augmented = AugmentedSegmentation(train_set, data_config.mean, data_config.std,
                                      data_config.test_scale, config.crop_size,
                                      config.scale_range, config.seed)
    sampler = torch.utils.data.DistributedSampler(
        augmented, info.world_size, info.rank, shuffle=True, seed=config.seed) \
        if info.world_size > 1 else None
    loader_args = dict(batch_size=config.batch_size, num_workers=config.num_workers,
                       drop_last=True, persistent_workers=False)
    epoch = start_iter * config.batch_size * info.world_size // max(1, len(augmented))

    def batches():
        nonlocal epoch
        while True:
            augmented.epoch = epoch
            generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
                loader = torch.utils.data.DataLoader(augmented, sampler=sampler, **loader_args)
            else:
                loader = torch.utils.data.DataLoader(augmented, shuffle=True,
                                                     generator=generator, **loader_args)
            yield from loader
            epoch += 1

    _log(info, f"training {config.variant} ({data_config.num_classes} classes) on "
               f"{len(train_set)} images, {info.world_size} process(es) on {device}, "
               f"iterations {start_iter}..{config.iters}")
    stream = batches()
    started, window_start = time.time(), time.time()
    history = []
    for iteration in range(start_iter, config.iters):
        wrapped.train()
        factor = lr_factor(iteration, config.iters, config.warmup_iters,
                           config.warmup_start_factor)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        images, labels = next(stream)
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
            logits = wrapped(images)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad:
            torch.nn.utils.clip_grad_norm_(wrapped.parameters(), config.clip_grad)
        optimizer.step()

        done = iteration + 1
        if done % config.log_interval == 0 or done == config.iters:
            elapsed = time.time() - window_start
            per_iter = elapsed / config.log_interval
            eta = per_iter * (config.iters - done)
            _log(info, f"iter {done}/{config.iters}  loss {loss.item():.4f}  "
                       f"lr {optimizer.param_groups[0]['lr']:.2e}  {per_iter:.2f} s/iter  "
                       f"eta {eta / 60:.1f} min")
            window_start = time.time()
        if done % config.val_interval == 0 or done == config.iters:
            metrics = evaluate(model, val_set, data_config, device, config.val_max_images, info)
            history.append({"iter": done, "mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"]})
            _log(info, f"iter {done}: val mIoU {100 * metrics['mIoU']:.2f}  "
                       f"aAcc {100 * metrics['aAcc']:.2f}")
            if metrics["mIoU"] > best["mIoU"]:
                best = {"mIoU": metrics["mIoU"], "iter": done, "IoU": metrics["IoU"]}
                if info.is_main:
                    _save(work_dir / "best_mIoU.pth", model, None, done, best, config, data_config)
        if info.is_main and (done % config.checkpoint_interval == 0 or done == config.iters):
            _save(latest, model, optimizer, done, best, config, data_config)
        if info.world_size > 1 and done % config.checkpoint_interval == 0:
            dist.barrier()

    summary = {"variant": config.variant, "iters": config.iters, "best": best,
               "history": history, "train_minutes": (time.time() - started) / 60,
               "world_size": info.world_size, "device": str(device),
               "config": _jsonable(asdict(config))}
    return finish_run(info, work_dir, summary)


def finish_run(info: DistInfo, work_dir: Path, summary: dict) -> dict:
    """Write WORK_DIR/summary.json (main process), then leave the process group together."""
    if info.is_main:
        (Path(work_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary


def _check_classes(dataset: SegmentationDataset, data_config) -> None:
    if dataset.class_names and len(dataset.class_names) != data_config.num_classes:
        raise ValueError(
            f"the dataset has {len(dataset.class_names)} classes but the model's head has "
            f"{data_config.num_classes}; pick a variant or checkpoint with that many classes")


def _with_dataset_classes(config, dataset: SegmentationDataset):
    """Name the classes after the dataset being trained on (its palette too, when it has one)."""
    from dataclasses import replace

    from lrformer_edge.data.classes import distinct_palette

    names = dataset.class_names
    if not names or tuple(names) == config.data.class_names:
        return config
    palette = dataset.palette or distinct_palette(len(names))
    return replace(config, data=replace(config.data, class_names=tuple(names),
                                        palette=tuple(palette)))


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _save(path: Path, model: nn.Module, optimizer, iteration: int, best: dict,
          config: TrainConfig, data_config) -> None:
    meta = {
        "iter": iteration, "variant": config.variant, "seed": config.seed,
        "best_mIoU": best.get("mIoU"), "best_iter": best.get("iter"),
        "dataset_meta": {"classes": list(data_config.class_names),
                         "palette": [list(c) for c in data_config.palette]},
        "train_config": _jsonable(asdict(config)), **config.extra_meta,
    }
    extra = {"optimizer": optimizer.state_dict()} if optimizer is not None else {}
    save_mmseg_checkpoint(model.state_dict(), path, meta, **extra)


def _resume(path: Path, model: nn.Module, optimizer) -> tuple[int, dict]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    load_into(model, read_state_dict(path), source=str(path))
    if "optimizer" in payload:
        optimizer.load_state_dict(payload["optimizer"])
    meta = payload.get("meta", {})
    best = {"mIoU": meta.get("best_mIoU") or -1.0, "iter": meta.get("best_iter") or 0}
    return int(meta.get("iter", 0)), best


def export_bundled_weights(checkpoint: str | Path, output: str | Path) -> Path:
    """Half-precision safetensors of a trained checkpoint (how the bundled model is stored)."""
    from safetensors.torch import save_file

    from lrformer_edge.models.checkpoint import atomic_write, checkpoint_variant

    variant = checkpoint_variant(checkpoint) or ""
    state_dict = read_state_dict(checkpoint)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous()
            for k, v in state_dict.items()}
    return atomic_write(output, lambda tmp: save_file(half, tmp, metadata={"format": "pt", "variant": variant}))
