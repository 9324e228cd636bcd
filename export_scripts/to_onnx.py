"""Export LRFormer to ONNX (fixed resolution, exact static pooling), then check it against PyTorch.

    python export_scripts/to_onnx.py                       # bundled model, 512x512 -> lrformer.onnx
    python export_scripts/to_onnx.py --variant lrformer-t --checkpoint lrformer_t_ade.pth \\
        --input-size 512 512 --output lrformer-t.onnx --dynamic-batch

The file is single-file ONNX (weights inside), embeds its metadata (variant, classes, palette,
mean/std, input size, checkpoint SHA-256, versions) and is written only after ONNX Runtime
reproduces the PyTorch logits (max-abs, cosine, argmax agreement); otherwise the script fails.
--validate [N] then runs the file in ONNX Runtime on N held-out procedural scenes and compares it
with the FP32 PyTorch model: mIoU, delta and pixel agreement.
"""
from __future__ import annotations

import argparse

from lrformer_edge.artifacts.parity import ParityThresholds
from lrformer_edge.backends.onnxruntime.export import MAX_OPSET, MIN_OPSET, export_onnx
from lrformer_edge.cli import (
    add_model_arguments,
    add_validate_argument,
    check_output_argument,
    check_validate_argument,
)
from lrformer_edge.export_flow import export_command


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, default=1, help="fixed batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    parser.add_argument("--opset", type=int, default=MIN_OPSET,
                        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {MIN_OPSET})")
    parser.add_argument("--simplify", action="store_true", help="run onnxsim (pip install onnxsim)")
    parser.add_argument("--max-abs", type=float, default=ParityThresholds.max_abs,
                        help="parity: largest tolerated logits difference")
    add_validate_argument(parser)
    parser.add_argument("--output", default="lrformer.onnx", help="output .onnx file")
    args = parser.parse_args(argv)
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        parser.error(f"--opset must lie in {MIN_OPSET}..{MAX_OPSET} (TensorRT 10.x parses up to "
                     f"{MAX_OPSET}), got {args.opset}")
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if not args.output.endswith(".onnx"):
        parser.error(f"--output must end in .onnx, got {args.output}")
    check_validate_argument(parser, args)
    if args.validate and args.batch_size != 1:
        parser.error("--validate runs one image at a time: use --batch-size 1 or --dynamic-batch")
    check_output_argument(args.output, "--output")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    batch_size = None if args.dynamic_batch else args.batch_size
    return export_command(
        args, lambda model, size, _: export_onnx(
            model, args.output, size, batch_size=batch_size, opset=args.opset,
            simplify=args.simplify, parity=ParityThresholds(max_abs=args.max_abs)),
        what=f"ONNX, batch {batch_size or 'dynamic'}, opset {args.opset}")


if __name__ == "__main__":
    raise SystemExit(main())
