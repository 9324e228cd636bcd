"""Quantization-aware training (NNCF), distilled from the FP32 model, exported to every INT8 target.

    python calibration/make_dataset.py --output data/procedural          # if you have no data
    python calibration/qat.py --data data/procedural --iters 300 --output runs/qat
    torchrun --nproc-per-node 2 calibration/qat.py --data ... --output ...   # DDP

Starts from NNCF post-training quantization of the deploy form at --input-size (default: the
variant's native size; calibrated on --calib-images of --calib-data, default the training split of
--data), fine-tunes with KL distillation from the FP32 model (plus cross-entropy on the labels with
--task-weight > 0; BatchNorm statistics and dropout frozen unless --update-bn-stats), evaluates
mIoU every --val-interval iterations, keeps OUTPUT/best.pth and the resumable OUTPUT/latest.pth
(NNCF config + state dict + optimizer; --resume continues), then exports the best model into
OUTPUT with the exporter of each --target backend (--help lists what each writes; the TensorRT
Q/DQ ONNX is what to_tensorrt.py --qat-checkpoint or --from-onnx builds engines from). Each export
is checked against the torch fake-quant model before it is written.
--cpu-isa (default portable) names the x86 CPUs the OpenVINO INT8 model must be correct on:
portable trains 7-bit weights (no x86 CPU saturates them; with --target all the Q/DQ ONNX gets
them too), vnni/amx full 8-bit weights; targets that all accumulate int8 in 32 bits (--target
tensorrt) always keep 8-bit weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lrformer_edge.cli import (
    add_calibration_arguments,
    add_int8_target_argument,
    add_model_arguments,
    calibration_source,
    check_calibration_arguments,
    check_output_argument,
)
from lrformer_edge.quant.qat import (
    ALL_TARGETS,
    QAT_TARGETS,
    QATConfig,
    qat_artifacts,
    run_qat,
)


def parse_args(argv=None) -> argparse.Namespace:
    defaults = QATConfig(data="", work_dir="")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset root with train and val splits")
    parser.add_argument("--output", required=True, type=Path, help="work and export folder")
    add_model_arguments(parser)
    writes = "; ".join(f"{backend.name}: OUTPUT/{path.name}" for backend, path in
                       qat_artifacts("", ALL_TARGETS, "VARIANT"))
    parser.add_argument("--target", choices=QAT_TARGETS, default=defaults.target,
                        help=f"backends the INT8 model is made for and exported to ({writes}; "
                             f"{ALL_TARGETS}: every one, from one model with the quantizer rules "
                             f"of all; default {defaults.target})")
    add_int8_target_argument(parser)
    parser.add_argument("--iters", type=int, default=defaults.iters)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--distill-weight", type=float, default=defaults.distill_weight)
    parser.add_argument("--task-weight", type=float, default=defaults.task_weight,
                        help="weight of the cross-entropy label loss (default 0: distillation "
                             "from the FP32 model only; 1 adds the labels, and the INT8 model "
                             "then drifts from FP32)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--update-bn-stats", action="store_true",
                        help="update BatchNorm running statistics and use dropout while training "
                             "(default: both frozen as in inference; batches are small)")
    parser.add_argument("--val-interval", type=int, default=defaults.val_interval)
    parser.add_argument("--val-images", type=int, default=defaults.val_images)
    add_calibration_arguments(parser, default_source="--data", what="QAT starting point",
                              images=QATConfig.calib_images)
    parser.add_argument("--threads", type=int, help="torch threads per process")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/latest.pth")
    parser.add_argument("--no-export", action="store_true", help="train only")
    args = parser.parse_args(argv)
    check_calibration_arguments(parser, args)
    for name in ("iters", "batch_size", "val_interval", "val_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.lr <= 0 or args.temperature <= 0 or args.distill_weight < 0 or args.task_weight < 0:
        parser.error("--lr and --temperature must be positive, --distill-weight and "
                     "--task-weight non-negative")
    if args.distill_weight == 0 and args.task_weight == 0:
        parser.error("--distill-weight and --task-weight cannot both be 0")
    check_output_argument(args.output, "--output", "folder")
    if not args.no_export:  # refused now rather than after training
        for _, path in qat_artifacts(args.output, args.target, args.variant):
            check_output_argument(path, "--output", "file" if path.suffix else "artifact-folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_qat(_config(args), export=not args.no_export)


def _config(args) -> QATConfig:
    return QATConfig(
        data=args.data, work_dir=str(args.output), variant=args.variant,
        checkpoint=args.checkpoint, target=args.target, cpu_isa=args.cpu_isa,
        input_size=tuple(args.input_size) if args.input_size else None,
        iters=args.iters, batch_size=args.batch_size, lr=args.lr,
        distill_weight=args.distill_weight, task_weight=args.task_weight,
        temperature=args.temperature, update_bn_stats=args.update_bn_stats,
        val_interval=args.val_interval, val_images=args.val_images,
        calib_images=args.calib_images, calib_source=calibration_source(args, args.data),
        seed=args.seed, resume=args.resume, threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
