"""Measure how much each layer suffers from quantization, rank the layers per scheme, and pick
the layers to keep in higher precision.

    python calibration/sensitivity.py --output runs/sensitivity                 # bundled model
    python calibration/sensitivity.py --min-agreement 99.85 --output runs/sens   # + int8 config
    python calibration/sensitivity.py --scheme palette4 --max-size-mib 9 --output runs/sens

For every --scheme, on --images held-out procedural scenes (or the first of --data's val split),
the deploy form at --input-size is fake-quantized in PyTorch: each layer alone, every layer, and
every layer but one (for the --top layers), scored against the FP32 deploy form (logits KL and
SQNR, pixel agreement, mIoU change). int8 activation ranges come from --calib-images images
(the exporters' calibration set). Writes OUTPUT/sensitivity.json, .md and .html (ranked tables,
a bar plot per scheme) and, with a bound (--max-drop, --min-agreement or --max-size-mib), the
smallest measured selection meeting it as OUTPUT/precision-config-<scheme>.json for each scheme
it applies to: every exporter takes it with --precision-config.
Exit code 0: done; 1: a bound could not be met (the reports are written, that config is not,
except under --max-float-gmacs: then the config of every ranked layer within the budget is
written, marked bound_met false, since a backend's own recipe may do better than the simulation);
2: bad input (nothing written).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lrformer_edge.artifacts.precision_config import SCHEMES
from lrformer_edge.cli import (
    add_calibration_arguments,
    add_model_arguments,
    calibration_source,
    check_calibration_arguments,
    check_output_argument,
)
from lrformer_edge.export_flow import load_model
from lrformer_edge.quant.selection import CRITERIA, Bound, check_bound
from lrformer_edge.quant.sensitivity import (
    DEFAULT_IMAGES,
    DEFAULT_SCHEMES,
    DEFAULT_TOP,
    check_compute_budget,
    run_sensitivity,
)
from lrformer_edge.quant.sensitivity_report import config_path, to_markdown, write_sensitivity
from lrformer_edge.resources import check_export_size

INPUT_ERROR_EXIT, BOUND_NOT_MET_EXIT = 2, 1
TABLE_HEAD_ROWS = 10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", metavar="DIR",
                        help="held-out images from this dataset root's val split (default: "
                             "procedural held-out scenes)")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, metavar="N",
                        help=f"held-out images every case is scored on (default {DEFAULT_IMAGES})")
    add_calibration_arguments(parser, default_source="--data", what="int8 activation ranges")
    parser.add_argument("--scheme", nargs="+", choices=SCHEMES, default=list(DEFAULT_SCHEMES),
                        help=f"schemes to measure (default {' '.join(DEFAULT_SCHEMES)})")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="M",
                        help=f"layers per scheme that get an all-but-one case for the ranking "
                             f"(default {DEFAULT_TOP})")
    bounds = parser.add_mutually_exclusive_group()
    for criterion in CRITERIA.values():
        bounds.add_argument(f"--{criterion.name}", type=float, metavar=criterion.metavar,
                            help=f"select layers to raise: {criterion.help} (schemes: "
                                 f"{', '.join(criterion.schemes)})")
    parser.add_argument("--max-float-gmacs", type=float, metavar="G",
                        help="int8 selection: keep at most G GMACs per image in float (a latency "
                             "budget: float layers run slower than int8 ones); ranked layers "
                             "that would exceed it are skipped")
    parser.add_argument("--output", required=True, type=Path, help="folder for the reports and "
                                                                   "precision configs")
    args = parser.parse_args(argv)
    check_calibration_arguments(parser, args)
    if args.images < 1:
        parser.error(f"--images must be positive, got {args.images}")
    if args.top < 0:
        parser.error(f"--top must be 0 or more, got {args.top}")
    try:
        args.bound = bound_from_args(args)
        check_bound(args.bound, args.scheme)
        check_compute_budget(args.max_float_gmacs, args.bound, args.scheme)
    except ValueError as error:
        parser.error(str(error))
    check_output_argument(args.output, "--output", "folder")
    return args


def bound_from_args(args) -> Bound | None:
    for name in CRITERIA:
        value = getattr(args, name.replace("-", "_"))
        if value is not None:
            return Bound(name, value)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    try:
        model = load_model(args.variant, args.checkpoint)
        input_size = check_export_size(model, args.input_size)
        run = run_sensitivity(model, input_size, args.scheme, args.images, args.calib_images,
                              args.top, args.data, calibration_source(args, args.data),
                              args.seed, args.bound, args.max_float_gmacs)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return INPUT_ERROR_EXIT
    written, unmet = write_sensitivity(run, args.output)
    print(to_markdown(run, rows_per_scheme=TABLE_HEAD_ROWS))
    print("wrote " + ", ".join(str(path) for path in written.values()))
    print(f"total time {time.perf_counter() - began:.0f} s")
    for scheme in unmet:
        path = config_path(args.output, scheme)
        if path.name in written:
            print(f"error: {args.bound.describe()} was not met for {scheme} within "
                  f"--max-float-gmacs {args.max_float_gmacs:g} in the simulation; {path} keeps "
                  f"every ranked layer the budget allows in float (bound_met: false): a "
                  f"backend's own recipe may still meet it (e.g. to_openvino.py --smooth-quant "
                  f"0.5), so export it with --validate", file=sys.stderr)
        else:
            print(f"error: {args.bound.describe()} was not met for {scheme} even with every "
                  f"ranked layer raised; no precision config was written for it (see the "
                  f"report)", file=sys.stderr)
    return BOUND_NOT_MET_EXIT if unmet else 0


if __name__ == "__main__":
    raise SystemExit(main())
