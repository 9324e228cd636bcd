"""Export LRFormer to ONNX (fixed resolution, exact static pooling), then check it against PyTorch.

    python export_scripts/to_onnx.py                       # bundled model, 512x512 -> lrformer.onnx
    python export_scripts/to_onnx.py --variant lrformer-t --checkpoint lrformer_t_ade.pth \\
        --input-size 512 512 --output lrformer-t.onnx --dynamic-batch

The file is single-file ONNX (weights inside), embeds its metadata (variant, classes, palette,
mean/std, input size, checkpoint SHA-256, versions) and is written only after ONNX Runtime
reproduces the PyTorch logits (max-abs, cosine, argmax agreement); otherwise the script fails.
"""
from __future__ import annotations

import argparse

from lrformer_edge.artifacts.parity import ParityThresholds
from lrformer_edge.artifacts.result import run_export_cli
from lrformer_edge.backends.onnxruntime.export import MAX_OPSET, MIN_OPSET, export_onnx
from lrformer_edge.cli import add_model_arguments, check_output_argument
from lrformer_edge.models.factory import create_model
from lrformer_edge.resources import check_export_size


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
    parser.add_argument("--output", default="lrformer.onnx", help="output .onnx file")
    args = parser.parse_args(argv)
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        parser.error(f"--opset must lie in {MIN_OPSET}..{MAX_OPSET} (TensorRT 10.x parses up to "
                     f"{MAX_OPSET}), got {args.opset}")
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if not args.output.endswith(".onnx"):
        parser.error(f"--output must end in .onnx, got {args.output}")
    check_output_argument(args.output, "--output")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def export():
        model = create_model(args.variant, checkpoint=args.checkpoint)
        size = tuple(args.input_size) if args.input_size else model.config.data.native_size
        size = check_export_size(model, size)
        print(f"exporting {model.config.name} at {size[0]}x{size[1]}, "
              f"batch {'dynamic' if args.dynamic_batch else args.batch_size}, opset {args.opset}")
        return export_onnx(model, args.output, size,
                           batch_size=None if args.dynamic_batch else args.batch_size,
                           opset=args.opset, simplify=args.simplify,
                           parity=ParityThresholds(max_abs=args.max_abs))

    code, result = run_export_cli(export)
    if result is not None:
        print(result.summary())
    return code


if __name__ == "__main__":
    raise SystemExit(main())
