"""Validate artifacts of any backend against the FP32 PyTorch ground truth, gate regressions and
write JSON / Markdown / HTML reports.

    python deploy/validate.py --artifacts lrformer.onnx lrformer-ov/ lrformer-int8/ --report out/
    python deploy/validate.py --artifacts m.onnx --save-reference ref.npz --report out/  # workstation
    python deploy/validate.py --artifacts m.engine --load-reference ref.npz --report out/  # Jetson

Every artifact runs through the same preprocess -> runner -> postprocess path on the validation
set (--data DIR: the first --images of its val split; default: held-out procedural scenes).
Exit code 0: the gate passed; 1: a threshold was crossed (each violation names the backend, the
metric, the value and the limit) or an artifact failed to run; 2: bad input. Artifacts that need
hardware or packages missing here are reported as skipped with the reason (--require-all makes
that a failure).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lrformer_edge.backends import artifact_kinds
from lrformer_edge.cli import (
    add_backend_option_arguments,
    backend_options_from_args,
    check_output_argument,
)
from lrformer_edge.registry import list_models
from lrformer_edge.validation import ValidationConfig, run_validation

GATE_FAILED_EXIT, INPUT_ERROR_EXIT = 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", nargs="+", type=Path, required=True,
                        help=f"artifacts of any backend: {artifact_kinds()}")
    parser.add_argument("--report", type=Path, required=True, help="folder for the reports")
    parser.add_argument("--data", help="dataset root (ADE20K/Cityscapes/COCO-Stuff/folder pairs)")
    parser.add_argument("--images", type=int, default=100, help="validation images (default 100)")
    parser.add_argument("--variant", choices=list_models(), metavar="NAME",
                        help="variant of the reference (default: the bundled model)")
    parser.add_argument("--reference", help="checkpoint of the FP32 ground truth (default: the "
                                            "variant's bundled weights)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="reference input size (default: the first artifact's)")
    parser.add_argument("--thresholds", type=Path,
                        help="gate thresholds YAML (default: lrformer_edge/validation/"
                             "thresholds.yaml)")
    reference = parser.add_mutually_exclusive_group()
    reference.add_argument("--save-reference", type=Path, metavar="FILE.npz",
                           help="also save the ground-truth outputs for devices without PyTorch")
    reference.add_argument("--load-reference", type=Path, metavar="FILE.npz",
                           help="use saved ground-truth outputs instead of running PyTorch")
    parser.add_argument("--logit-images", type=int, default=5,
                        help="samples whose reference logits are kept for max-abs/cosine")
    add_backend_option_arguments(parser)
    parser.add_argument("--require-all", action="store_true",
                        help="fail the gate when an artifact was skipped")
    args = parser.parse_args(argv)
    if args.load_reference and (args.reference or args.variant or args.input_size):
        parser.error("--load-reference fixes the reference; leave out --reference, --variant "
                     "and --input-size")
    check_output_argument(args.report, "--report", "folder")
    check_output_argument(args.save_reference, "--save-reference")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    config = ValidationConfig(
        artifacts=args.artifacts, report_dir=args.report, data=args.data, images=args.images,
        variant=args.variant, reference_checkpoint=args.reference,
        input_size=tuple(args.input_size) if args.input_size else None,
        thresholds=args.thresholds, save_reference=args.save_reference,
        load_reference=args.load_reference, logit_images=args.logit_images,
        backend_options=backend_options_from_args(args), require_all=args.require_all)
    try:
        outcome = run_validation(config)
    except (ValueError, ImportError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return INPUT_ERROR_EXIT
    print(outcome.reports["report.md"].read_text())
    print("reports: " + ", ".join(str(p) for p in outcome.reports.values()))
    if outcome.violations:
        print("GATE FAILED:\n" + "\n".join(f"  {v}" for v in outcome.violations), file=sys.stderr)
        return GATE_FAILED_EXIT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
