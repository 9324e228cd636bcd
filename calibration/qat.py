"""Quantization-aware training (NNCF), distilled from the FP32 model, exported to every INT8 target.

    python calibration/make_dataset.py --output data/procedural          # if you have no data
    python calibration/qat.py --data data/procedural --iters 300 --output runs/qat
    torchrun --nproc-per-node 2 calibration/qat.py --data ... --output ...   # DDP

Starts from NNCF post-training quantization of the deploy form at --input-size (calibrated on
--calib-images of the training split), fine-tunes with KL distillation from the FP32 model (plus
cross-entropy on the labels with --task-weight > 0; BatchNorm statistics and dropout frozen unless
--update-bn-stats), evaluates mIoU every --val-interval iterations, keeps OUTPUT/best.pth and the
resumable OUTPUT/latest.pth (NNCF config + state dict + optimizer; --resume continues), then
exports the best model:
  --target openvino  OUTPUT/openvino-int8/ (INT8 IR)
  --target tensorrt  OUTPUT/lrformer-qat-int8.onnx (Q/DQ ONNX for to_tensorrt.py --qat-checkpoint
                     or --from-onnx)
  --target all       both (TensorRT quantizer rules, which OpenVINO runs too)
Each export is checked against the torch fake-quant model before it is written.
--cpu-isa (default portable) names the x86 CPUs the OpenVINO INT8 model must be correct on:
portable trains 7-bit weights (no x86 CPU saturates them; with --target all the Q/DQ ONNX gets
them too), vnni/amx full 8-bit weights; --target tensorrt alone always keeps 8-bit weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lrformer_edge.cli import add_int8_target_argument, check_output_argument
from lrformer_edge.registry import BUNDLED_MODEL, list_models

OPENVINO_EXPORT, TENSORRT_EXPORT = "openvino-int8", "lrformer-qat-int8.onnx"  # in --output


def parse_args(argv=None) -> argparse.Namespace:
    from lrformer_edge.quant.qat import QAT_TARGETS, QATConfig

    defaults = QATConfig(data="", work_dir="")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset root with train and val splits")
    parser.add_argument("--output", required=True, type=Path, help="work and export folder")
    parser.add_argument("--variant", default=BUNDLED_MODEL, choices=list_models(), metavar="NAME")
    parser.add_argument("--checkpoint", help="FP32 weights (default: the variant's bundled ones)")
    parser.add_argument("--target", choices=QAT_TARGETS, default=defaults.target)
    add_int8_target_argument(parser)
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        default=defaults.input_size)
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
    parser.add_argument("--calib-images", type=int, default=defaults.calib_images)
    parser.add_argument("--calib-data", help="calibration source (default: --data)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, help="torch threads per process")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/latest.pth")
    parser.add_argument("--no-export", action="store_true", help="train only")
    args = parser.parse_args(argv)
    for name in ("iters", "batch_size", "val_interval", "val_images", "calib_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.lr <= 0 or args.temperature <= 0 or args.distill_weight < 0 or args.task_weight < 0:
        parser.error("--lr and --temperature must be positive, --distill-weight and "
                     "--task-weight non-negative")
    if args.distill_weight == 0 and args.task_weight == 0:
        parser.error("--distill-weight and --task-weight cannot both be 0")
    check_output_argument(args.output, "--output", "folder")
    if not args.no_export and args.target in ("openvino", "all"):  # refused after training else
        check_output_argument(args.output / OPENVINO_EXPORT, "--output", "artifact-folder")
    if not args.no_export and args.target in ("tensorrt", "all"):
        check_output_argument(args.output / TENSORRT_EXPORT, "--output")
    return args


def export_best(output: Path, target: str) -> list:
    from lrformer_edge.data.calibration import build_calibration_set
    from lrformer_edge.quant.qat import (
        export_qat_openvino,
        export_qat_qdq_onnx,
        restore,
    )

    quantized, payload = restore(output / "best.pth")
    size = tuple(payload["input_size"])
    feed = build_calibration_set("procedural", quantized.config.data, size, 1, seed=123).batches[0]
    results = []
    if target in ("openvino", "all"):
        results.append(export_qat_openvino(quantized, payload, output / OPENVINO_EXPORT, feed))
    if target in ("tensorrt", "all"):
        results.append(export_qat_qdq_onnx(quantized, payload, output / TENSORRT_EXPORT, feed))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    from lrformer_edge.artifacts.result import run_export_cli
    from lrformer_edge.quant.qat import QATConfig, train_qat

    config = QATConfig(
        data=args.data, work_dir=str(args.output), variant=args.variant,
        checkpoint=args.checkpoint, target=args.target, cpu_isa=args.cpu_isa, input_size=tuple(args.input_size),
        iters=args.iters, batch_size=args.batch_size, lr=args.lr,
        distill_weight=args.distill_weight, task_weight=args.task_weight,
        temperature=args.temperature, update_bn_stats=args.update_bn_stats,
        val_interval=args.val_interval, val_images=args.val_images,
        calib_images=args.calib_images, calib_source=args.calib_data, seed=args.seed,
        resume=args.resume, threads=args.threads)
    code, summary = run_export_cli(lambda: train_qat(config))
    if code:
        return code
    if int(os.environ.get("RANK", "0")) != 0 or args.no_export:
        return 0
    print(f"best validation mIoU {100 * summary['best']['mIoU']:.2f} at iteration "
          f"{summary['best']['iter']} (FP32 {100 * summary['fp32_mIoU']:.2f}, PTQ "
          f"{100 * summary['ptq_mIoU']:.2f}); {summary['minutes']:.1f} min")
    code, results = run_export_cli(lambda: export_best(args.output, args.target))
    for result in results or []:
        print(result.summary().replace("parity vs PyTorch", "parity vs the QAT fake-quant model"))
    if results:
        (args.output / "exports.json").write_text(json.dumps(
            [{"path": str(r.path), "parity_vs_qat_model": r.parity.as_dict()} for r in results],
            indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
