"""Export LRFormer to an OpenVINO IR (FP32, FP16 or INT8), parity-checked against PyTorch.

    python export_scripts/to_openvino.py --precision fp32 --output lrformer-ov/
    python export_scripts/to_openvino.py --precision int8 --calib-data data/ade --max-drop 0.5 \\
        --variant lrformer-t --checkpoint CKPT --input-size 512 512 --output lrformer-t-int8/

The IR embeds its metadata in rt_info (for INT8 also the quantization settings and the
calibration set's source, size, seed and SHA-256), is compared with the PyTorch model by an
OpenVINO runner set explicitly to f32 inference precision (OpenVINO defaults to bf16 on AMX CPUs),
and must compile under the f32, bf16 and f16 hints before the folder is written.
INT8: NNCF post-training quantization (model_type TRANSFORMER, symmetric, SmoothQuant off) on
--calib-images real images (300 by default) of --calib-data; --max-drop enables accuracy control
against the FP32 model's own predictions (mIoU points). --cpu-isa names the x86 CPUs the INT8 IR
must be correct on (default portable: every x86 CPU; vnni/amx: full 8-bit weights that saturate
on CPUs without VNNI); the IR records it and the runner warns on a CPU it does not suit.
"""
from __future__ import annotations

import argparse

from lrformer_edge.artifacts.result import run_export_cli
from lrformer_edge.backends.openvino.export import (
    IR_PRECISIONS,
    export_openvino,
    target_cpu_line,
)
from lrformer_edge.cli import (
    add_int8_target_argument,
    add_model_arguments,
    check_output_argument,
)
from lrformer_edge.models.factory import create_model
from lrformer_edge.resources import check_export_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--precision", choices=IR_PRECISIONS, default="fp32",
                        help="weights precision of the IR")
    parser.add_argument("--calib-data", default="procedural",
                        help="int8: dataset root, image folder, or 'procedural' (default)")
    parser.add_argument("--calib-images", type=int, default=300, help="int8: calibration images")
    parser.add_argument("--max-drop", type=float,
                        help="int8: accuracy control, largest mIoU drop (points) vs FP32")
    parser.add_argument("--seed", type=int, default=0, help="int8: calibration sampling seed")
    add_int8_target_argument(parser)
    parser.add_argument("--output", required=True, help="output folder (replaced when complete)")
    args = parser.parse_args(argv)
    if args.precision != "int8" and args.max_drop is not None:
        parser.error("--max-drop applies to --precision int8 only")
    if args.precision != "int8" and args.cpu_isa is not None:
        parser.error("--cpu-isa applies to --precision int8 only")
    if args.calib_images < 1:
        parser.error("--calib-images must be positive")
    check_output_argument(args.output, "--output", "artifact-folder")

    def export():
        model = create_model(args.variant, checkpoint=args.checkpoint)
        size = args.input_size or model.config.data.native_size
        size = check_export_size(model, size,
                                 args.calib_images if args.precision == "int8" else 0)
        calibration = None
        if args.precision == "int8":
            from lrformer_edge.data.calibration import build_calibration_set

            calibration = build_calibration_set(args.calib_data, model.config.data, size,
                                                args.calib_images, args.seed)
            print(f"calibration set: {len(calibration.batches)} images from {args.calib_data}, "
                  f"sha256 {calibration.sha256[:16]}...")
        return export_openvino(model, args.output, size, args.precision,
                               calibration=calibration, max_drop=args.max_drop,
                               target_isa=args.cpu_isa)

    code, result = run_export_cli(export)
    if result is not None:
        print(result.summary())
        print(target_cpu_line(result.metadata))
        print("compiles under the f32, bf16 and f16 inference-precision hints")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
