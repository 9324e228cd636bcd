"""Export LRFormer to a TensorRT engine: a TensorRT-ready ONNX (any machine), then the engine
(where TensorRT and an NVIDIA GPU exist).

    python export_scripts/to_tensorrt.py --int8 --onnx-only           # here: Q/DQ ONNX only
    python export_scripts/to_tensorrt.py --int8 --output lrformer-int8.engine --validate
    python export_scripts/to_tensorrt.py --from-onnx lrformer-int8.onnx --int8 \\
        --timing-cache trt.cache --output lrformer-int8.engine        # on the Jetson

--int8 is explicit quantization (TensorRT 10.1 deprecated and 11 removed implicit calibration):
a Q/DQ ONNX from NNCF post-training calibration on --calib-images real images (symmetric int8,
zero-points 0, per-channel weights, per-tensor activations; LayerNorm, Softmax and the resizes in
float). --fp16 writes an FP16 ONNX with LayerNorm/Softmax/Resize and I/O in FP32. Engines are
built strongly typed, so the ONNX's types are what runs on TensorRT 10.x and 11.x alike.
--int8 --precision-config F (written by calibration/sensitivity.py): its float layers get no Q/DQ
(FP32 in a strongly typed build), and the ONNX records their layer-precision list, which a
TensorRT 10.x build applies in a weakly typed network (those layers in FP16, LayerNorm, Softmax and
the resizes pinned to FP32); the equivalent trtexec line is printed.

The ONNX is written next to --output (same name, .onnx) after it passed the structural checks and
a comparison with PyTorch in ONNX Runtime. Without TensorRT or a GPU the script then stops with
exit code 3 and prints the command to run on the target; --onnx-only makes that a success.
TensorRT and cuda-python come with pip install 'lrformer-edge[tensorrt-runtime]' (the
'tensorrt' extra holds NNCF only, for the Q/DQ ONNX).
--validate [N] compares the result (the engine, or the ONNX in ONNX Runtime with --onnx-only)
with the FP32 PyTorch model on N held-out procedural scenes: mIoU, delta and pixel agreement.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lrformer_edge.artifacts.result import run_export_cli
from lrformer_edge.backends.tensorrt.command import tensorrt_command
from lrformer_edge.backends.tensorrt.engine import ENGINE_SUFFIXES, onnx_path_for
from lrformer_edge.backends.tensorrt.export import TRT_PRECISIONS
from lrformer_edge.cli import (
    add_calibration_arguments,
    add_model_arguments,
    add_precision_config_argument,
    add_statistics_cache_arguments,
    add_validate_argument,
    check_calibration_arguments,
    check_output_argument,
    check_validate_argument,
    precision_config_from_args,
)
from lrformer_edge.export_flow import run_command


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    precision = parser.add_mutually_exclusive_group(required=True)
    for name in TRT_PRECISIONS:
        precision.add_argument(f"--{name}", dest="precision", action="store_const", const=name)
    add_calibration_arguments(parser, what="--int8")
    add_statistics_cache_arguments(parser)
    parser.add_argument("--qat-checkpoint", type=Path, metavar="CKPT",
                        help="int8: take Q/DQ from a QAT checkpoint of calibration/qat.py "
                             "instead of post-training calibration")
    add_precision_config_argument(parser, "--int8 (post-training Q/DQ)")
    parser.add_argument("--onnx-only", action="store_true",
                        help="stop after the TensorRT-ready ONNX (success without TensorRT)")
    parser.add_argument("--from-onnx", type=Path,
                        help="build from an ONNX written by step 1 (with --calib-data: checked "
                             "against the set the ONNX was calibrated with)")
    parser.add_argument("--workspace", type=int, metavar="MiB", help="builder workspace limit")
    parser.add_argument("--dla-core", type=int, metavar="N", help="DLA core (Jetson), GPU fallback")
    parser.add_argument("--timing-cache", type=Path, metavar="FILE",
                        help="read (if present) and update this timing cache")
    add_validate_argument(parser)
    parser.add_argument("--verbose", action="store_true", help="TensorRT builder log")
    parser.add_argument("--output", type=Path, help="engine file (default lrformer-PRECISION.engine)")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = Path(f"lrformer-{args.precision}{ENGINE_SUFFIXES[0]}")
    if args.output.suffix not in ENGINE_SUFFIXES:
        parser.error(f"--output must end in {' or '.join(ENGINE_SUFFIXES)}, got {args.output}")
    check_calibration_arguments(parser, args, calibrates=args.precision == "int8", what="--int8")
    if args.from_onnx and args.input_size:
        parser.error("--input-size is fixed by the ONNX given with --from-onnx")
    if args.qat_checkpoint and (args.precision != "int8" or args.from_onnx or args.calib_data
                                or args.input_size):
        parser.error("--qat-checkpoint goes with --int8 only (its input size and quantizers come "
                     "from the checkpoint; no --from-onnx, --calib-data or --input-size)")
    if args.precision_config and (args.precision != "int8" or args.from_onnx
                                  or args.qat_checkpoint):
        parser.error("--precision-config goes with --int8 post-training Q/DQ only (an ONNX "
                     "given with --from-onnx or a QAT checkpoint already has its quantizers)")
    check_validate_argument(parser, args)
    check_output_argument(args.output, "--output")
    if not args.from_onnx:
        check_output_argument(onnx_path_for(args.output), "the ONNX next to --output")
    check_output_argument(args.timing_cache, "--timing-cache")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    code, precision_config = run_export_cli(lambda: precision_config_from_args(args))
    if code:
        return code
    return run_command(args, lambda session: tensorrt_command(session, precision_config))


if __name__ == "__main__":
    raise SystemExit(main())
