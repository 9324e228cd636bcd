"""Export LRFormer to a LiteRT model (.tflite, formerly TensorFlow Lite) for Android (CPU, GPU and
NPU delegates) and ARM Linux; FP32, FP16 or INT8, parity-checked against PyTorch in LiteRT's
interpreter here.

    python export_scripts/to_litert.py --output lrformer.tflite
    python export_scripts/to_litert.py --precision fp16 --output lrformer-fp16.tflite
    python export_scripts/to_litert.py --precision int8 --calib-data data/ade \\
        --output lrformer-int8.tflite
    python export_scripts/to_litert.py --variant lrformer-t --checkpoint CKPT \\
        --input-size 512 512 --precision int8 --validate --threads 2 --output lrformer-t.tflite
    python export_scripts/to_litert.py --variant lrformer-t --checkpoint CKPT \\
        --input-size 512 512 --precision int8 --precision-config precision-config.json \\
        --output lrformer-t-mixed.tflite

litert-torch converts the deploy form to an FP32 model; ai-edge-quantizer then makes --precision
fp16 (float16 weights) or int8 (static int8 weights and activations for the convolutions and
linears, float input and output; activations calibrated on --calib-images images of --calib-data,
32 procedural scenes by default, seeded and hashed into the metadata). --precision-config (a file
written by calibration/sensitivity.py) keeps the operators of its float layers float (found in
the converted model by their weights) and is recorded in the metadata. The model carries the
artifact metadata (variant, classes, palette, mean/std, input size, checkpoint and calibration
hashes, versions, the recipe, stage timings, and which operators compute in int8 and which stay
float) in its flatbuffer metadata, as lrformer_metadata. The export runs the .tflite with
--threads threads against the PyTorch model and writes it only when they agree.
--validate [N] then runs it on N held-out procedural scenes and compares it with the FP32 PyTorch
model: mIoU, delta and pixel agreement.
"""
from __future__ import annotations

import argparse

from lrformer_edge.backends.litert.export import check_output_path, export_litert
from lrformer_edge.backends.litert.format import PRECISIONS
from lrformer_edge.cli import (
    add_calibration_arguments,
    add_model_arguments,
    add_precision_config_argument,
    add_validate_argument,
    check_calibration_arguments,
    check_output_argument,
    check_validate_argument,
    precision_config_from_args,
)
from lrformer_edge.export_flow import export_command


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32; fp16 weights; int8 weights and activations (calibrated)")
    add_calibration_arguments(parser, what="--precision int8")
    add_precision_config_argument(parser, "--precision int8")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="LiteRT threads for calibration and the parity check "
                             "(default: LiteRT's)")
    add_validate_argument(parser)
    parser.add_argument("--output", required=True, help="the .tflite file to write")
    args = parser.parse_args(argv)
    int8 = args.precision == "int8"
    check_calibration_arguments(parser, args, calibrates=int8, what="--precision int8")
    if args.precision_config and not int8:
        parser.error("--precision-config applies to --precision int8 only")
    try:
        precision_config_from_args(args)  # read now: a bad file is one line before any work
    except ValueError as error:
        parser.error(str(error))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    check_validate_argument(parser, args)
    check_output_argument(args.output, "--output")
    try:
        check_output_path(args.output)
    except ValueError as error:  # not a .tflite
        parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    precision_config = precision_config_from_args(args)
    return export_command(
        args, lambda model, size, calibration: export_litert(
            model, args.output, size, args.precision, calibration=calibration,
            threads=args.threads, precision_config=precision_config),
        what=f"an {args.precision.upper()} LiteRT model", calibrates=args.precision == "int8")


if __name__ == "__main__":
    raise SystemExit(main())
