"""Parameters and GMACs of LRFormer variants at an input size.

    python deploy/model_summary.py --variant lrformer-t lrformer-s --input-size 512 512
"""
from __future__ import annotations

import argparse

from lrformer_edge.registry import list_models
from lrformer_edge.summary import summarize


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs="+", default=["lrformer-t"], choices=list_models(),
                        metavar="NAME", help=f"one or more of: {', '.join(list_models())}")
    parser.add_argument("--input-size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--num-classes", type=int, help="override the head's class count")
    args = parser.parse_args(argv)
    height, width = args.input_size
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        parser.error(f"--input-size must be positive multiples of 32, got {height} {width}")
    print(f"{'variant':<24}{'classes':>8}{'params (M)':>12}{'GMACs':>10}  input")
    for variant in args.variant:
        summary = summarize(variant, (height, width), args.num_classes)
        print(f"{variant:<24}{summary.num_classes:>8}{summary.parameters / 1e6:>12.2f}"
              f"{summary.gmacs:>10.2f}  {height}x{width}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
