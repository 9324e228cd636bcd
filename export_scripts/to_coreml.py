"""Export LRFormer to a Core ML ML program (.mlpackage) for iPhone, iPad and Mac.

    python export_scripts/to_coreml.py --output lrformer.mlpackage                 # FP16, image in
    python export_scripts/to_coreml.py --weights int8 --output lrformer-w8.mlpackage
    python export_scripts/to_coreml.py --w8a8 --calib-data data/ade --output lrformer-w8a8.mlpackage
    python export_scripts/to_coreml.py --variant lrformer-t --checkpoint CKPT \\
        --input-size 512 512 --target iOS17 --weights palette4 --output-type labels \\
        --output seg.mlpackage
    python export_scripts/to_coreml.py --precision-config sensitivity/palette4.json \\
        --output lrformer-mixed.mlpackage          # palette4, the config's layers int8 / fp16

Conversion goes through torch.export + run_decompositions (coremltools' torch.export frontend).
--input-type image (default): an RGB image input taking camera pixels 0..255 directly, the
model's mean/std folded into the network; --input-type tensor: the normalised NCHW float32 input
every other runner takes. Outputs are float32 logits (1, C, H, W), or int32 class ids (1, H, W)
with --output-type labels. On iOS18/macOS15 attention is one scaled_dot_product_attention op.
Weights: float (fp16/fp32), int8 or int4 (per-channel symmetric; int4 iOS18+) or palette4 (4-bit
k-means LUTs, per 16 output channels on iOS18+); layers of at most 2048 weights stay float
(lrformer_edge/backends/coreml/compression.py). --precision-config F (from
calibration/sensitivity.py) sets them layer by layer: every layer at the config's scheme
(palette4, weights-int4 or int8), its overrides raised to int8 or kept float; the scheme sets
--weights (giving another is an error). --w8a8 quantizes activations too (int8, calibrated on
--calib-images of --calib-data; iOS17+; no precision config).

Core ML predicts only on macOS. Everywhere the package is checked before it is written:
spec version, inputs/outputs, FP16 compute, stored weight types, and every weight read back from
the package and compared with the PyTorch weights. --proxy-images N then measures mIoU and pixel
agreement with the FP32 model of a PyTorch proxy: the deploy form with the weights read back from
the package (and, for W8A8, the same int8 activation quantization). The proxy computes in
float32, so FP16 arithmetic on the device is not simulated.

--validate [N] compares the package with the FP32 PyTorch model on N held-out procedural scenes
(mIoU, delta, pixel agreement), as every exporter does: on macOS the package itself in Core ML;
elsewhere its PyTorch proxy, which then stands in for --proxy-images.
"""
from __future__ import annotations

import argparse

from lrformer_edge.artifacts.precision_config import PrecisionConfigError
from lrformer_edge.backends.coreml.compression import WEIGHTS_OF_PRECISION
from lrformer_edge.backends.coreml.export import (
    INPUT_TYPES,
    OUTPUT_TYPES,
    PRECISIONS,
    TARGETS,
    WEIGHT_MODES,
    CoreMLOptions,
    checked_options,
    export_coreml,
    package_summary,
    proxy_model,
)
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    defaults = CoreMLOptions()
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help="compute precision of the ML program")
    parser.add_argument("--weights", choices=WEIGHT_MODES,
                        help=f"weight storage (int8, int4: per-channel symmetric; palette4: "
                             f"4-bit LUT; default {defaults.weights}, or the --precision-config "
                             f"scheme's)")
    parser.add_argument("--w8a8", action="store_true",
                        help="int8 activations too (calibrated), int8 weights")
    parser.add_argument("--target", choices=TARGETS, default=defaults.target,
                        help="minimum deployment target")
    parser.add_argument("--output-type", choices=OUTPUT_TYPES, default=defaults.output_type)
    parser.add_argument("--input-type", choices=INPUT_TYPES, default=defaults.input_type)
    add_precision_config_argument(parser, "--weights palette4, int4 or int8 (scheme palette4, "
                                          "weights-int4 or int8)")
    add_calibration_arguments(parser, what="--w8a8")
    parser.add_argument("--proxy-images", type=int, default=20,
                        help="held-out procedural scenes for the PyTorch proxy's mIoU and "
                             "agreement with FP32 (0: skip)")
    add_validate_argument(parser)
    parser.add_argument("--output", required=True, help="the .mlpackage to write")
    args = parser.parse_args(argv)
    check_calibration_arguments(parser, args, calibrates=args.w8a8, what="--w8a8")
    if args.proxy_images < 0:
        parser.error("--proxy-images must be 0 or more")
    check_validate_argument(parser, args)
    try:
        args.config = precision_config_from_args(args)
    except PrecisionConfigError as error:
        parser.error(str(error))
    # A precision config's scheme sets the weights; a --weights that contradicts it is refused.
    args.weights = args.weights or (WEIGHTS_OF_PRECISION[args.config.scheme] if args.config
                                    else defaults.weights)
    try:
        args.options = checked_options(
            CoreMLOptions(precision=args.precision, weights=args.weights, w8a8=args.w8a8,
                          target=args.target, output_type=args.output_type,
                          input_type=args.input_type), args.config)
    except ValueError as error:  # a combination Core ML does not have (W8A8 before iOS17...)
        parser.error(str(error))
    check_output_argument(args.output, "--output", "artifact-folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return export_command(
        args, lambda model, size, calibration: export_coreml(
            model, args.output, size, args.options, calibration, precision_config=args.config),
        what=f"a Core ML package ({args.target}, {args.precision}, weights {args.weights}"
             f"{', W8A8' if args.w8a8 else ''}"
             f"{f', layer by layer from {args.precision_config}' if args.config else ''})",
        calibrates=args.w8a8, describe=package_summary,
        stand_in=lambda model, package, calibration: proxy_model(model, package,
                                                                 calibration=calibration),
        stand_in_images=args.proxy_images)


if __name__ == "__main__":
    raise SystemExit(main())
