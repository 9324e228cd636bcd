"""Parameters and GMACs of LRFormer variants at an input size (default: each one's native size).

    python deploy/model_summary.py --variant lrformer-t lrformer-s --input-size 512 512
"""
from __future__ import annotations

import argparse

from lrformer_edge.models import model_config
from lrformer_edge.models.deploy import check_input_size
from lrformer_edge.registry import input_size_of, list_models
from lrformer_edge.resources import check_memory
from lrformer_edge.summary import summarize


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs="+", default=["lrformer-t"], choices=list_models(),
                        metavar="NAME", help=f"one or more of: {', '.join(list_models())}")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size, multiples of 32 (default: each variant's native size)")
    parser.add_argument("--num-classes", type=int, help="override the head's class count")
    args = parser.parse_args(argv)
    if args.num_classes is not None and args.num_classes < 1:
        parser.error(f"--num-classes must be a positive number of classes, got {args.num_classes}")
    try:
        sizes = {}
        for variant in args.variant:  # every variant before the first line of the table
            config = model_config(variant, args.num_classes)
            sizes[variant] = check_input_size(input_size_of(config, args.input_size),
                                              "--input-size")
            check_memory(config, sizes[variant], "forward",
                         what=f"counting the GMACs of {variant}")
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"{'variant':<24}{'classes':>8}{'params (M)':>12}{'GMACs':>10}  input")
    for variant in args.variant:
        summary = summarize(variant, sizes[variant], args.num_classes)
        height, width = summary.input_size
        print(f"{variant:<24}{summary.num_classes:>8}{summary.parameters / 1e6:>12.2f}"
              f"{summary.gmacs:>10.2f}  {height}x{width}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
