"""Training and fine-tuning with the official recipe, on one process or many (torchrun + DDP).

Recipe (mmseg config of the release): AdamW (betas 0.9/0.999, weight decay 0.01, none on norms
and layer scales), 10x learning rate on the decode head, linear warm-up then poly decay (power 1),
gradient clipping at 35, random rescale (ratio 0.5-2.0 of the test scale), random crop with
cat_max_ratio 0.75, horizontal flip, photometric distortion, cross-entropy with ignore index 255.
Checkpoints use mmseg's layout (``{'meta', 'state_dict', 'optimizer'}``), so ours and the
official ones are interchangeable, and ``resume`` continues from the latest one exactly.
The loop's building blocks (process start, endless batches, DDP wrapping, evaluation, logging)
are QAT's too (``lrformer_edge.quant.qat``).
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

from lrformer_edge.artifacts.result import run_export_cli
from lrformer_edge.backends.pytorch.runner import TorchRunner
from lrformer_edge.data.datasets import IGNORE_INDEX, SegmentationDataset, open_dataset
from lrformer_edge.evaluation import confusion_of
from lrformer_edge.models.checkpoint import (
    load_into,
    read_state_dict,
    save_mmseg_checkpoint,
)
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.preprocess import normalize, rescale_size
from lrformer_edge.progress import track


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


def start_process(seed: int, threads: int | None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any), pick this process's device, set its
    torch threads and seed it (each rank its own random stream)."""
    info = init_distributed()
    if threads:
        torch.set_num_threads(threads)
    _seed_everything(seed + info.rank)
    return info, training_device(info)


def data_parallel(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``model`` wrapped for DDP when several processes train, else itself."""
    if info.world_size <= 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[info.local_rank] if device.type == "cuda" else None)


def log_main(info: DistInfo, message: str, log=print) -> None:
    """Every process runs the same loop; the main one speaks."""
    if info.is_main:
        log(message)


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


def training_batches(dataset: AugmentedSegmentation, batch_size: int, info: DistInfo, seed: int,
                     start_iter: int = 0, num_workers: int = 0):
    """Endless (images, labels) batches, reshuffled each epoch (sharded under DDP); a resumed run
    starts at the epoch ``start_iter`` falls in, so its shuffling continues as it would have."""
    sampler = torch.utils.data.DistributedSampler(
        dataset, info.world_size, info.rank, shuffle=True, seed=seed) \
        if info.world_size > 1 else None
    epoch = start_iter * batch_size * info.world_size // max(1, len(dataset))
    while True:
        dataset.epoch = epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
        # Without DDP the seeded generator makes the shuffle; the sampler shuffles by its own seed.
        generator = torch.Generator().manual_seed(seed * 1000 + epoch) if sampler is None \
            else None
        yield from torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, shuffle=sampler is None,
            drop_last=True, num_workers=num_workers, persistent_workers=False,
            generator=generator)
        epoch += 1


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


def evaluate(model: nn.Module, dataset, data_config, device, max_images: int | None = None,
             info: DistInfo | None = None, input_size=None) -> dict:
    """mIoU through the deploy pipeline's path, whole images or at the fixed ``input_size`` of a
    deploy-form model; shards over processes when DDP. ``dataset``: any indexable of samples."""
    info = info or DistInfo()
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    indices = range(info.rank, count, info.world_size)
    runner = TorchRunner(model, input_size=input_size, device=str(device))
    with SegmentationPipeline(runner, data_config, input_size) as pipeline:
        matrix, _ = confusion_of(pipeline, (dataset[i] for i in indices), total=len(indices),
                                 label="validation")
    return summed_over_processes(matrix, info).compute()


def summed_over_processes(matrix, info: DistInfo):
    """The confusion matrix of every process's shard together (all-reduce under DDP)."""
    if info.world_size > 1:
        totals = torch.from_numpy(matrix.matrix)
        dist.all_reduce(totals)
        matrix.matrix = totals.numpy()
    return matrix


# ----------------------------------------------------------------------------- the loop


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_due(done: int, interval: int, total: int) -> bool:
    """Whether a periodic step (logging, validation, checkpoint) runs after iteration ``done``."""
    return done % interval == 0 or done == total


class StepClock:
    """Seconds per iteration over the last logging window, and the time left."""

    def __init__(self, total: int):
        self.total = total
        self.window_start = time.time()

    def lap(self, done: int, window: int) -> str:
        per_iter = (time.time() - self.window_start) / window
        self.window_start = time.time()
        return f"{per_iter:.2f} s/iter  eta {per_iter * (self.total - done) / 60:.1f} min"


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass
class _Run:
    """A training run's state, shared by its steps."""

    config: TrainConfig
    info: DistInfo
    device: torch.device
    work_dir: Path
    model: nn.Module
    val_set: SegmentationDataset
    optimizer: torch.optim.Optimizer
    wrapped: nn.Module | None = None
    start_iter: int = 0
    best: dict = field(default_factory=lambda: {"mIoU": -1.0, "iter": 0})
    history: list = field(default_factory=list)


def train(config: TrainConfig) -> dict:
    """Train ``config.variant`` on ``config.data``; returns the final summary (also in JSON)."""
    info, device = start_process(config.seed, config.threads)
    train_set = open_dataset(config.data, "train", config.dataset_format)
    val_set = open_dataset(config.data, "val", config.dataset_format)
    model = _model_for(config, train_set)
    work_dir = Path(config.work_dir)
    if info.is_main:  # only now: bad data or a bad checkpoint leave no empty work dir behind
        work_dir.mkdir(parents=True, exist_ok=True)
    run = _start_run(config, info, device, work_dir, model, val_set)
    data = model.config.data
    batches = training_batches(
        AugmentedSegmentation(train_set, data.mean, data.std, data.test_scale, config.crop_size,
                              config.scale_range, config.seed),
        config.batch_size, info, config.seed, run.start_iter, config.num_workers)
    log_main(info, f"training {config.variant} ({data.num_classes} classes) on "
                   f"{len(train_set)} images, {info.world_size} process(es) on {device}, "
                   f"iterations {run.start_iter}..{config.iters}", _print)
    started, clock = time.time(), StepClock(config.iters)
    for iteration in track(range(run.start_iter, config.iters), what="iterations",
                           label="training"):
        loss = _train_step(run, next(batches), iteration)
        _after_step(run, iteration + 1, loss, clock)
    summary = {"variant": config.variant, "iters": config.iters, "best": run.best,
               "history": run.history, "train_minutes": (time.time() - started) / 60,
               "world_size": info.world_size, "device": str(device),
               "config": _jsonable(asdict(config))}
    return finish_run(info, work_dir, summary)


def _model_for(config: TrainConfig, train_set: SegmentationDataset) -> nn.Module:
    """The variant with a head for the dataset's classes (or the checkpoint's), named after them."""
    from lrformer_edge.models.factory import create_model

    model = create_model(config.variant, checkpoint=config.checkpoint, pretrained=False,
                         drop_path_rate=config.drop_path_rate,
                         num_classes=None if config.checkpoint else
                         (len(train_set.class_names) if train_set.class_names else None))
    _check_classes(train_set, model.config.data)
    model.config = _with_dataset_classes(model.config, train_set)
    return model


def _start_run(config: TrainConfig, info: DistInfo, device: torch.device, work_dir: Path,
               model: nn.Module, val_set: SegmentationDataset) -> _Run:
    """Optimizer, the resumed state where asked, and the DDP wrapping."""
    model.to(device)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.lr, config.weight_decay, config.head_lr_mult),
        lr=config.lr, betas=(0.9, 0.999))
    run = _Run(config, info, device, work_dir, model, val_set, optimizer)
    latest = work_dir / "latest.pth"
    if config.resume and latest.is_file():
        run.start_iter, run.best = _resume(latest, model, optimizer)
        log_main(info, f"resumed from {latest} at iteration {run.start_iter}", _print)
    if info.world_size > 1 and device.type == "cuda":
        run.model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    run.wrapped = data_parallel(run.model, info, device)
    return run


def _train_step(run: _Run, batch, iteration: int) -> torch.Tensor:
    """One optimizer step at the scheduled learning rate; returns the loss."""
    config = run.config
    run.wrapped.train()
    factor = lr_factor(iteration, config.iters, config.warmup_iters, config.warmup_start_factor)
    for group in run.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    images, labels = (tensor.to(run.device) for tensor in batch)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=config.amp):
        logits = run.wrapped(images)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(), config.clip_grad)
    run.optimizer.step()
    return loss


def _after_step(run: _Run, done: int, loss: torch.Tensor, clock: StepClock) -> None:
    """Logging, validation (the best kept) and checkpoints, each at its interval."""
    config, info = run.config, run.info
    if is_due(done, config.log_interval, config.iters):
        log_main(info, f"iter {done}/{config.iters}  loss {loss.item():.4f}  "
                       f"lr {run.optimizer.param_groups[0]['lr']:.2e}  "
                       f"{clock.lap(done, config.log_interval)}", _print)
    if is_due(done, config.val_interval, config.iters):
        _validate(run, done)
    if info.is_main and is_due(done, config.checkpoint_interval, config.iters):
        _save(run.work_dir / "latest.pth", run.model, run.optimizer, done, run.best, config,
              run.model.config.data)
    if info.world_size > 1 and done % config.checkpoint_interval == 0:
        dist.barrier()


def _validate(run: _Run, done: int) -> None:
    config, data = run.config, run.model.config.data
    metrics = evaluate(run.model, run.val_set, data, run.device, config.val_max_images, run.info)
    run.history.append({"iter": done, "mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"]})
    log_main(run.info, f"iter {done}: val mIoU {100 * metrics['mIoU']:.2f}  "
                       f"aAcc {100 * metrics['aAcc']:.2f}", _print)
    if metrics["mIoU"] > run.best["mIoU"]:
        run.best = {"mIoU": metrics["mIoU"], "iter": done, "IoU": metrics["IoU"]}
        if run.info.is_main:
            _save(run.work_dir / "best_mIoU.pth", run.model, None, done, run.best, config, data)


def finish_run(info: DistInfo, work_dir: Path, summary: dict) -> dict:
    """Write WORK_DIR/summary.json (main process), then leave the process group together."""
    if info.is_main:
        (Path(work_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    if info.world_size > 1:
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


def run_training(config: TrainConfig, export_bundled: str | Path | None = None) -> int:
    """``calibration/train.py``: train, then (main process) write WORK_DIR/best_mIoU.pth as
    bundled weights to ``export_bundled`` where given; the exit code. Bad data, checkpoints or
    options give one line on stderr and 2, with nothing written."""
    code, summary = run_export_cli(lambda: train(config))
    if code:
        return code
    best = summary["best"]
    print(f"best val mIoU {100 * best['mIoU']:.2f} at iteration {best['iter']} "
          f"({summary['train_minutes']:.1f} min)")
    if export_bundled and os.environ.get("RANK", "0") == "0":
        code, path = run_export_cli(lambda: export_bundled_weights(
            Path(config.work_dir) / "best_mIoU.pth", export_bundled))
        if path:
            print(f"wrote {path}")
    return code


def export_bundled_weights(checkpoint: str | Path, output: str | Path) -> Path:
    """Half-precision safetensors of a trained checkpoint (how the bundled model is stored)."""
    from safetensors.torch import save_file

    from lrformer_edge.models.checkpoint import atomic_write, checkpoint_variant

    variant = checkpoint_variant(checkpoint) or ""
    state_dict = read_state_dict(checkpoint)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous()
            for k, v in state_dict.items()}
    return atomic_write(output, lambda tmp: save_file(half, tmp, metadata={"format": "pt", "variant": variant}))
