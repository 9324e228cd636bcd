"""Export LRFormer to an OpenVINO IR (FP32, FP16 or INT8), parity-checked against PyTorch.

    python export_scripts/to_openvino.py --precision fp32 --output lrformer-ov/
    python export_scripts/to_openvino.py --precision int8 --calib-data data/ade --max-drop 0.5 \\
        --variant lrformer-t --checkpoint CKPT --input-size 512 512 --output lrformer-t-int8/

The IR embeds its metadata in rt_info (for INT8 also the quantization settings and the
calibration set's source, size, seed and SHA-256), is compared with the PyTorch model by an
OpenVINO runner set explicitly to f32 inference precision (OpenVINO defaults to bf16 on AMX CPUs),
and must compile under the f32, bf16 and f16 hints before the folder is written (those the CPU
runs natively: on a CPU without bf16/f16 those hints run the f32 program, and the summary says so).
INT8: NNCF post-training quantization (model_type TRANSFORMER, symmetric; SmoothQuant off unless
--smooth-quant ALPHA turns it on for the convolutions: model-dependent, measure it) on
--calib-images real images (32 by default) of --calib-data; --max-drop enables accuracy control
against the FP32 model's own predictions (mIoU points). --cpu-isa names the x86 CPUs the INT8 IR
must be correct on (default portable: every x86 CPU; vnni/amx: full 8-bit weights that saturate
on CPUs without VNNI); the IR records it and the runner warns on a CPU it does not suit.
--precision-config F (int8; written by calibration/sensitivity.py) keeps its float layers out of
NNCF's quantization (an ignored scope by operation name) and is recorded in the IR.
--validate [N] then runs the IR (f32 inference precision) on N held-out procedural scenes and
compares it with the FP32 PyTorch model: mIoU, delta and pixel agreement.
"""
from __future__ import annotations

import argparse

from lrformer_edge.artifacts.result import run_export_cli
from lrformer_edge.backends.nncf_statistics import statistics_cache_from_args
from lrformer_edge.backends.openvino.export import (
    compile_check_line,
    export_openvino,
    precision_config_lines,
    target_cpu_line,
)
from lrformer_edge.backends.openvino.ir import IR_PRECISIONS
from lrformer_edge.backends.openvino.ptq import (
    check_smooth_quant,
    check_statistics_cache_request,
)
from lrformer_edge.cli import (
    add_calibration_arguments,
    add_int8_target_argument,
    add_model_arguments,
    add_precision_config_argument,
    add_statistics_cache_arguments,
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
    parser.add_argument("--precision", choices=IR_PRECISIONS, default="fp32",
                        help="weights precision of the IR")
    add_calibration_arguments(parser)
    add_statistics_cache_arguments(parser)
    parser.add_argument("--max-drop", type=float,
                        help="int8: accuracy control, largest mIoU drop (points) vs FP32")
    add_int8_target_argument(parser)
    parser.add_argument("--smooth-quant", type=float, metavar="ALPHA",
                        help="int8: SmoothQuant on convolutions with this alpha in (0, 1] "
                             "(default off; model-dependent: 0.5 helps the bundled LRFormer-T, "
                             "check yours with --validate)")
    add_precision_config_argument(parser, "--precision int8")
    add_validate_argument(parser)
    parser.add_argument("--output", required=True, help="output folder (replaced when complete)")
    args = parser.parse_args(argv)
    int8 = args.precision == "int8"
    if not int8 and args.max_drop is not None:
        parser.error("--max-drop applies to --precision int8 only")
    if not int8 and args.cpu_isa is not None:
        parser.error("--cpu-isa applies to --precision int8 only")
    if not int8 and args.precision_config:
        parser.error("--precision-config applies to --precision int8 only")
    if not int8 and args.smooth_quant is not None:
        parser.error("--smooth-quant applies to --precision int8 only")
    try:
        check_smooth_quant(args.smooth_quant)
    except ValueError as error:
        parser.error(f"--smooth-quant: {error}")
    try:
        check_statistics_cache_request(args.smooth_quant, args.statistics_cache)
    except ValueError:
        parser.error("--statistics-cache goes with plain INT8 only: a --smooth-quant export "
                     "measures its statistics afresh each time and would not use the file; "
                     "leave out --statistics-cache")
    check_calibration_arguments(parser, args, calibrates=int8, what="--precision int8")
    check_validate_argument(parser, args)
    check_output_argument(args.output, "--output", "artifact-folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    code, precision_config = run_export_cli(lambda: precision_config_from_args(args))
    if code:
        return code
    return export_command(
        args, lambda model, size, calibration: export_openvino(
            model, args.output, size, args.precision, calibration=calibration,
            max_drop=args.max_drop, target_isa=args.cpu_isa,
            statistics_cache=statistics_cache_from_args(args),
            precision_config=precision_config, smooth_quant=args.smooth_quant),
        what=f"an {args.precision} OpenVINO IR", calibrates=args.precision == "int8",
        describe=lambda metadata: [
            target_cpu_line(metadata),
            *precision_config_lines(metadata),
            compile_check_line()])


if __name__ == "__main__":
    raise SystemExit(main())
