"""Export LRFormer to an OpenVINO IR (FP32 or FP16 weights), parity-checked against PyTorch.

    python export_scripts/to_openvino.py --precision fp32 --output lrformer-ov/
    python export_scripts/to_openvino.py --variant lrformer-t --checkpoint CKPT \\
        --input-size 512 1024 --precision fp16 --output lrformer-t-ov/

The IR embeds its metadata in rt_info, is compared with the PyTorch model by an OpenVINO runner
set explicitly to f32 inference precision (OpenVINO defaults to bf16 on AMX CPUs), and must
compile under the f32, bf16 and f16 hints before the folder is written. INT8 (NNCF PTQ with
accuracy control) is not implemented yet.
"""
from __future__ import annotations

import argparse
import sys

from lrformer_edge.export.onnx import ParityError
from lrformer_edge.export.openvino import IR_PRECISIONS, export_openvino
from lrformer_edge.models.checkpoint import CheckpointError
from lrformer_edge.models.factory import create_model
from lrformer_edge.registry import BUNDLED_MODEL, list_models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default=BUNDLED_MODEL, choices=list_models(), metavar="NAME")
    parser.add_argument("--checkpoint", help="default: the variant's bundled weights, if any")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="fixed input size, multiples of 32 (default: the variant's native size)")
    parser.add_argument("--precision", choices=IR_PRECISIONS, default="fp32",
                        help="weights precision of the IR")
    parser.add_argument("--output", required=True, help="output folder (replaced when complete)")
    args = parser.parse_args(argv)
    try:
        model = create_model(args.variant, checkpoint=args.checkpoint)
        result = export_openvino(model, args.output, args.input_size, args.precision)
    except (CheckpointError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ParityError as error:
        print(f"PARITY CHECK FAILED, nothing written: {error}", file=sys.stderr)
        return 1
    print(result.summary())
    print("compiles under the f32, bf16 and f16 inference-precision hints")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
