"""Write the procedural street-scene dataset in the ADE20K or Cityscapes layout.

    python calibration/make_dataset.py --output data/procedural --train 2000 --val 100
"""
from __future__ import annotations

import argparse
import inspect
import os
import time

from lrformer_edge.cli import check_output_argument
from lrformer_edge.data.procedural import (
    check_scene_size,
    write_ade20k_layout,
    write_cityscapes_layout,
)
from lrformer_edge.data.splits import split_seeds


def _size(writer) -> str:
    """A layout writer's default image size, for the help text."""
    return " ".join(str(v) for v in inspect.signature(writer).parameters["size"].default)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="dataset root folder to write")
    parser.add_argument("--layout", choices=("ade20k", "cityscapes"), default="ade20k")
    parser.add_argument("--train", type=int, default=2000, help="number of training images")
    parser.add_argument("--val", type=int, default=100, help="number of validation images")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help=f"image size (default {_size(write_ade20k_layout)} for ade20k, "
                             f"{_size(write_cityscapes_layout)} for cityscapes)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.train < 0 or args.val < 0:
        parser.error("--train and --val must be non-negative")
    if args.size is not None:
        try:
            check_scene_size(args.size)
        except ValueError as error:
            parser.error(f"--size: {error}")
    check_output_argument(args.output, "--output", "folder")
    size = {"size": tuple(args.size)} if args.size else {}  # else the layout writer's default
    start = time.time()
    if args.layout == "ade20k":
        seeds = split_seeds(args.train, args.val, names=("training", "validation"))
        write_ade20k_layout(args.output, seeds, workers=args.workers, **size)
    else:
        seeds = split_seeds(args.train, args.val, names=("train", "val"))
        write_cityscapes_layout(args.output, seeds, **size)
    print(f"wrote {args.train} training and {args.val} validation scenes to {args.output} "
          f"({args.layout} layout) in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
