"""Export LRFormer to a Core ML ML program (.mlpackage) for iPhone, iPad and Mac.

    python export_scripts/to_coreml.py --output lrformer.mlpackage                 # FP16, image in
    python export_scripts/to_coreml.py --weights int8 --output lrformer-w8.mlpackage
    python export_scripts/to_coreml.py --w8a8 --calib-data data/ade --output lrformer-w8a8.mlpackage
    python export_scripts/to_coreml.py --variant lrformer-t --checkpoint CKPT \\
        --input-size 512 512 --target iOS17 --weights palette4 --output-type labels \\
        --output seg.mlpackage

Conversion goes through torch.export + run_decompositions (coremltools' torch.export frontend).
--input-type image (default): an RGB image input taking camera pixels 0..255 directly, the
model's mean/std folded into the network; --input-type tensor: the normalised NCHW float32 input
every other runner takes. Outputs are float32 logits (1, C, H, W), or int32 class ids (1, H, W)
with --output-type labels. On iOS18/macOS15 attention is one scaled_dot_product_attention op.
Weights: float (fp16/fp32), int8 (per-channel symmetric) or palette4 (4-bit k-means LUTs, per
16 output channels on iOS18+). --w8a8 quantizes activations too (int8, calibrated on
--calib-images of --calib-data; iOS17+).

Core ML predicts only on macOS. Everywhere the package is checked before it is written:
spec version, inputs/outputs, FP16 compute, stored weight types, and every weight read back from
the package and compared with the PyTorch weights. --proxy-images N then measures mIoU and pixel
agreement with the FP32 model of a PyTorch proxy: the deploy form with the weights read back from
the package (and, for W8A8, the same int8 activation quantization). The proxy computes in
float32, so FP16 arithmetic on the device is not simulated.
"""
from __future__ import annotations

import argparse
import json

from lrformer_edge.artifacts.result import run_export_cli
from lrformer_edge.backends.coreml.export import (
    INPUT_TYPES,
    OUTPUT_TYPES,
    PRECISIONS,
    TARGETS,
    WEIGHT_MODES,
    CoreMLOptions,
)
from lrformer_edge.cli import add_model_arguments, check_output_argument
from lrformer_edge.models.factory import create_model
from lrformer_edge.resources import check_export_size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    defaults = CoreMLOptions()
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help="compute precision of the ML program")
    parser.add_argument("--weights", choices=WEIGHT_MODES, default=defaults.weights,
                        help="weight storage (int8: per-channel symmetric; palette4: 4-bit LUT)")
    parser.add_argument("--w8a8", action="store_true",
                        help="int8 activations too (calibrated), int8 weights")
    parser.add_argument("--target", choices=TARGETS, default=defaults.target,
                        help="minimum deployment target")
    parser.add_argument("--output-type", choices=OUTPUT_TYPES, default=defaults.output_type)
    parser.add_argument("--input-type", choices=INPUT_TYPES, default=defaults.input_type)
    parser.add_argument("--calib-data", default="procedural",
                        help="--w8a8: dataset root, image folder, video or 'procedural' (default)")
    parser.add_argument("--calib-images", type=int, default=64,
                        help="--w8a8: calibration images (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="--w8a8: calibration sampling seed")
    parser.add_argument("--proxy-images", type=int, default=20,
                        help="held-out procedural scenes for the PyTorch proxy's mIoU and "
                             "agreement with FP32 (0: skip)")
    parser.add_argument("--output", required=True, help="the .mlpackage to write")
    args = parser.parse_args(argv)
    if not args.w8a8 and args.calib_data != "procedural":
        parser.error("--calib-data applies to --w8a8 only")
    if args.calib_images < 1:
        parser.error("--calib-images must be positive")
    if args.proxy_images < 0:
        parser.error("--proxy-images must be 0 or more")
    check_output_argument(args.output, "--output", "artifact-folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from lrformer_edge.backends.coreml.export import export_coreml
    from lrformer_edge.evaluation import proxy_accuracy

    state = {}

    def export():
        options = CoreMLOptions(precision=args.precision, weights=args.weights, w8a8=args.w8a8,
                                target=args.target, output_type=args.output_type,
                                input_type=args.input_type)
        model = create_model(args.variant, checkpoint=args.checkpoint)
        size = tuple(args.input_size or model.config.data.native_size)
        size = check_export_size(model, size, args.calib_images if args.w8a8 else 0)
        calibration = None
        if args.w8a8:
            from lrformer_edge.data.calibration import build_calibration_set

            calibration = build_calibration_set(args.calib_data, model.config.data, size,
                                                args.calib_images, args.seed)
            print(f"calibration set: {len(calibration.batches)} images from {args.calib_data}, "
                  f"sha256 {calibration.sha256[:16]}...")
        state.update(model=model, size=size, calibration=calibration)
        return export_coreml(model, args.output, size, options, calibration)

    code, result = run_export_cli(export)
    if result is None:
        return code
    print(result.summary())
    package, weights = result.metadata["package"], result.metadata["weights"]
    print(f"package: spec version {package['spec_version']} ({package['target']}), "
          f"inputs {json.dumps(package['inputs'])}, outputs {json.dumps(package['outputs'])}")
    print(f"compute dtypes {package['compute_dtypes']}; stored weights {package['weight_dtypes']}")
    top = sorted(package["op_counts"].items(), key=lambda kv: -kv[1])[:12]
    print("ops: " + ", ".join(f"{name} {count}" for name, count in top))
    print(f"weights read back: {weights['compared']} tensors compared "
          f"({weights['by_storage']}), worst relative error "
          f"{weights['worst_relative_error']:.2e}, min cosine {weights['min_cosine']:.6f}; "
          f"{len(weights['not_found'])} merged by the converter into the op that follows them "
          f"(BatchNorm, layer scale)")
    fused = package["op_counts"].get("scaled_dot_product_attention", 0)
    print(f"attention: {fused} fused scaled_dot_product_attention ops" if fused else
          "attention: decomposed into matmul/softmax (fused attention needs --target iOS18 "
          "or macOS15)")
    if args.proxy_images:
        code, accuracy = run_export_cli(lambda: proxy_accuracy(
            state["model"], result.path, args.proxy_images, state["calibration"]))
        if accuracy is None:
            return code
        print(f"PyTorch proxy on {accuracy['images']} held-out scenes: mIoU "
              f"{100 * accuracy['proxy_mIoU']:.2f} vs FP32 {100 * accuracy['fp32_mIoU']:.2f} "
              f"({100 * (accuracy['proxy_mIoU'] - accuracy['fp32_mIoU']):+.2f} points), "
              f"pixel agreement {100 * accuracy['pixel_agreement']:.2f}%")
    print("Core ML prediction itself needs macOS; check the package there with "
          "deploy/validate.py --artifacts " + str(result.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
