"""The speed/accuracy front of a sensitivity ranking on each backend: keep the k most sensitive
layers in higher precision, k = 0, 1, 2, 4, 8, 16, export with the backend itself, and measure
each artifact against the FP32 PyTorch model through the validation harness.

    python calibration/sensitivity.py --output runs/sens
    python calibration/front.py --sensitivity runs/sens/sensitivity.json --backend openvino \\
        tensorrt --output runs/front

Per point: pixel agreement, mIoU and its delta, median latency (where the backend runs here) and
artifact size; where it cannot run (Core ML off macOS) its PyTorch proxy (the package's weights
read back) is measured instead. The artifacts stay in OUTPUT/artifacts/ so a point can be taken
as it is; OUTPUT/front.json and front.html (one plot per backend) hold the figures. The same
model (--variant/--checkpoint) and input size as the sensitivity run are required.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lrformer_edge.cli import (
    add_calibration_arguments,
    add_model_arguments,
    calibration_from_args,
    check_calibration_arguments,
    check_output_argument,
)
from lrformer_edge.cpu import host_cpu
from lrformer_edge.export_flow import load_model
from lrformer_edge.files import atomic_write
from lrformer_edge.quant.selection import Rankings, top_k_config
from lrformer_edge.quant.sensitivity_report import front_html
from lrformer_edge.validation.front import FRONT_KS, describe_point, needs_calibration, run_fronts

INPUT_ERROR_EXIT = 2
FRONT_IMAGES = 20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--sensitivity", required=True, type=Path, metavar="JSON",
                        help="the sensitivity.json of calibration/sensitivity.py")
    parser.add_argument("--backend", nargs="+", metavar="NAME",
                        help="backends to measure (default: every backend that exports a "
                             "precision config of the ranked schemes)")
    parser.add_argument("--k", nargs="+", type=int, default=list(FRONT_KS), metavar="K",
                        help=f"layers kept in higher precision per point (default "
                             f"{' '.join(map(str, FRONT_KS))})")
    parser.add_argument("--images", type=int, default=FRONT_IMAGES, metavar="N",
                        help=f"held-out procedural scenes per point (default {FRONT_IMAGES})")
    parser.add_argument("--data", metavar="DIR", help="held-out images from this dataset root's "
                                                      "val split instead")
    add_calibration_arguments(parser)
    parser.add_argument("--output", required=True, type=Path, help="folder for the results")
    args = parser.parse_args(argv)
    check_calibration_arguments(parser, args)
    if args.images < 1:
        parser.error(f"--images must be positive, got {args.images}")
    check_output_argument(args.output, "--output", "folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rankings = Rankings.load(args.sensitivity)
        model = load_model(args.variant, args.checkpoint)
        size = tuple(args.input_size or rankings.input_size)
        top_k_config(rankings, next(iter(rankings.orders)), 0).check_fits(model, size)
        calibration = calibration_from_args(args, model.config.data, size) \
            if needs_calibration(rankings, args.backend) else None
        points = run_fronts(model, size, rankings, args.backend, args.images,
                            args.output / "artifacts", calibration, args.k, args.data)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return INPUT_ERROR_EXIT
    records = [point.as_dict() for point in points]
    title = (f"{model.config.name} {size[0]}x{size[1]}: speed/accuracy fronts on "
             f"{args.images} held-out images ({host_cpu().describe()})")
    document = {"title": title, "cpu": host_cpu().describe(), "images": args.images,
                "sensitivity": str(args.sensitivity), "points": records}
    for name, text in (("front.json", json.dumps(document, indent=2) + "\n"),
                       ("front.html", front_html(records, title))):
        atomic_write(args.output / name, lambda tmp, text=text: Path(tmp).write_text(text))
    print(title)
    for point in points:
        print(f"{point.backend} {point.scheme} {describe_point(point)}")
    print(f"wrote {args.output / 'front.json'}, {args.output / 'front.html'}")
    return 1 if any(point.status != "ok" for point in points) else 0


if __name__ == "__main__":
    raise SystemExit(main())
