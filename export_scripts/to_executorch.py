"""Export LRFormer to an ExecuTorch program (.pte) with the XNNPACK delegate, for Android, iOS and
ARM Linux CPUs; FP32 or INT8, parity-checked against PyTorch in ExecuTorch's runtime here.

    python export_scripts/to_executorch.py --output lrformer.pte
    python export_scripts/to_executorch.py --int8 --calib-data data/ade --output lrformer-int8.pte
    python export_scripts/to_executorch.py --variant lrformer-t --checkpoint CKPT \\
        --input-size 512 512 --int8 --validate --threads 2 --output lrformer-t-int8.pte
    python export_scripts/to_executorch.py --variant lrformer-t --checkpoint CKPT \\
        --input-size 512 512 --int8 --precision-config precision-config.json \\
        --output lrformer-t-mixed.pte

The deploy form goes through torch.export and to_edge_transform_and_lower with the XNNPACK
partitioner; --int8 first quantizes it with PT2E and the XNNPACK quantizer (symmetric int8,
per-channel weights), activations calibrated on --calib-images images of --calib-data (32
procedural scenes by default; seeded, and hashed into the metadata). --precision-config (a file
written by calibration/sensitivity.py) keeps its float layers out of that quantization, by module
name, and is recorded in the metadata. The program carries the
artifact metadata (variant, classes, palette, mean/std, input size, checkpoint and calibration
hashes, versions, the export's stage timings and operator counts) in a constant method,
lrformer_metadata. The export prints how long each stage took and which operators stay outside
XNNPACK (by name and count), runs the .pte with --threads threads (default ExecuTorch's) against
the PyTorch model, and writes it only when they agree.
--validate [N] then runs it on N held-out procedural scenes and compares it with the FP32 PyTorch
model: mIoU, delta and pixel agreement.
"""
from __future__ import annotations

import argparse

from lrformer_edge.backends.executorch.export import check_output_path, export_executorch
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
    parser.add_argument("--int8", action="store_true",
                        help="PT2E INT8 (XNNPACK quantizer), calibrated on --calib-data")
    add_calibration_arguments(parser, what="--int8")
    add_precision_config_argument(parser, "--int8")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="ExecuTorch threads for the parity check (default: ExecuTorch's)")
    add_validate_argument(parser)
    parser.add_argument("--output", required=True, help="the .pte file to write")
    args = parser.parse_args(argv)
    check_calibration_arguments(parser, args, calibrates=args.int8, what="--int8")
    if args.precision_config and not args.int8:
        parser.error("--precision-config applies to --int8 only")
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
    except ValueError as error:  # not a .pte
        parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    precision = "int8" if args.int8 else "fp32"
    precision_config = precision_config_from_args(args)
    return export_command(
        args, lambda model, size, calibration: export_executorch(
            model, args.output, size, precision, calibration=calibration, threads=args.threads,
            precision_config=precision_config),
        what=f"an {precision.upper()} ExecuTorch program (XNNPACK)", calibrates=args.int8)


if __name__ == "__main__":
    raise SystemExit(main())
