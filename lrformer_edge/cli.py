"""Arguments shared by the command-line tools (the scripts stay thin and say the same thing)."""
from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--variant, --checkpoint and --input-size, as every exporter takes them."""
    from lrformer_edge.registry import BUNDLED_MODEL, list_models

    parser.add_argument("--variant", default=BUNDLED_MODEL, choices=list_models(), metavar="NAME",
                        help=f"registry name (default {BUNDLED_MODEL}); see list_models()")
    parser.add_argument("--checkpoint",
                        help="checkpoint to export (default: the variant's bundled weights, if any)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="fixed input size, multiples of 32 (default: the variant's native "
                             "size)")
