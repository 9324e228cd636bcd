"""Train or fine-tune an LRFormer variant with the official recipe; one process or torchrun/DDP.

    python calibration/train.py --variant lrformer-t.procedural --data data/procedural \\
        --work-dir runs/t-procedural --iters 4000 --batch-size 8 --crop-size 256 256
    torchrun --nproc-per-node 2 calibration/train.py ...      # DDP (gloo on CPU, nccl on GPU)

Checkpoints (mmseg layout, interchangeable with the official ones) go to WORK_DIR/latest.pth and
WORK_DIR/best_mIoU.pth; --resume continues from latest.pth.
"""
from __future__ import annotations

import argparse
import sys

from lrformer_edge.cli import check_output_argument
from lrformer_edge.data.datasets import DATASET_FORMATS
from lrformer_edge.registry import list_models
from lrformer_edge.training import TrainConfig, run_training


def parse_args(argv=None) -> argparse.Namespace:
    defaults = TrainConfig(variant="", data="", work_dir="")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", required=True, choices=list_models(), metavar="NAME",
                        help="registry name, e.g. lrformer-t")
    parser.add_argument("--data", required=True, help="dataset root (ADE20K/Cityscapes/COCO-Stuff layout)")
    parser.add_argument("--dataset-format", choices=tuple(DATASET_FORMATS),
                        help="layout of --data (detected when omitted)")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--checkpoint", help="initial weights to fine-tune from")
    parser.add_argument("--iters", type=int, default=defaults.iters)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    parser.add_argument("--crop-size", type=int, nargs=2, default=defaults.crop_size, metavar=("H", "W"))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--head-lr-mult", type=float, default=defaults.head_lr_mult)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-iters", type=int, default=defaults.warmup_iters)
    parser.add_argument("--drop-path-rate", type=float, default=defaults.drop_path_rate)
    parser.add_argument("--val-interval", type=int, default=defaults.val_interval)
    parser.add_argument("--val-max-images", type=int)
    parser.add_argument("--log-interval", type=int, default=defaults.log_interval)
    parser.add_argument("--checkpoint-interval", type=int, default=defaults.checkpoint_interval)
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--threads", type=int, help="torch intra-op threads per process")
    parser.add_argument("--amp", action="store_true",
                        help="bfloat16 mixed precision (CPU with AMX/AVX512-BF16, or GPU)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resume", action="store_true", help="continue from WORK_DIR/latest.pth")
    parser.add_argument("--export-bundled", metavar="FILE.safetensors",
                        help="after training, write best_mIoU.pth as fp16 safetensors here")
    args = parser.parse_args(argv)
    if args.iters <= 0 or args.batch_size <= 0:
        parser.error("--iters and --batch-size must be positive")
    check_output_argument(args.work_dir, "--work-dir", "folder")
    check_output_argument(args.export_bundled, "--export-bundled")
    try:
        args.config = _config(args)
    except ValueError as error:  # e.g. a crop size the model cannot take
        parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_training(args.config, export_bundled=args.export_bundled)


def _config(args) -> TrainConfig:
    return TrainConfig(
        variant=args.variant, data=args.data, work_dir=args.work_dir,
        dataset_format=args.dataset_format, checkpoint=args.checkpoint, iters=args.iters,
        batch_size=args.batch_size, crop_size=tuple(args.crop_size), lr=args.lr,
        head_lr_mult=args.head_lr_mult, weight_decay=args.weight_decay,
        warmup_iters=args.warmup_iters, drop_path_rate=args.drop_path_rate,
        val_interval=args.val_interval, val_max_images=args.val_max_images,
        log_interval=args.log_interval, checkpoint_interval=args.checkpoint_interval,
        num_workers=args.num_workers, threads=args.threads, seed=args.seed, resume=args.resume, amp=args.amp,
        extra_meta={"command": " ".join(sys.argv)},
    )


if __name__ == "__main__":
    raise SystemExit(main())
