"""Arguments shared by the command-line tools (the scripts stay thin and say the same thing)."""
from __future__ import annotations

import argparse
import os
import sys


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


def check_output_argument(path: str | os.PathLike | None, flag: str, kind: str = "file") -> None:
    """Refuse an unusable output path right after parsing, before any work starts: one line on
    stderr and exit code 2, as for any other bad argument (None: the option was not given).

    ``kind``: "file" (written or overwritten), "folder" (files are written into it: reports,
    work folders) or "artifact-folder" (replaced whole by an export: only when empty or a
    previous artifact of ours)."""
    from lrformer_edge import files

    if path is None:
        return
    check = {"file": files.check_output_file, "folder": files.check_output_folder,
             "artifact-folder": files.check_replaceable_folder}[kind]
    try:
        check(path, flag)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def add_int8_target_argument(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """--cpu-isa: the x86 CPUs an OpenVINO INT8 model is made for (see lrformer_edge.cpu);
    ``several``: one INT8 model per named target (the benchmark compares them)."""
    from lrformer_edge.cpu import DEFAULT_INT8_TARGET, INT8_TARGET_CHOICES

    parser.add_argument(
        "--cpu-isa", choices=INT8_TARGET_CHOICES, nargs="+" if several else None,
        default=[DEFAULT_INT8_TARGET] if several else None,
        help=f"int8: x86 CPUs the OpenVINO INT8 model must be correct on (default "
             f"{DEFAULT_INT8_TARGET}: every x86 CPU, 7-bit weights so that CPUs without VNNI "
             f"cannot saturate their 16-bit int8 sums); vnni / amx: full 8-bit weights for CPUs "
             f"with VNNI or AMX only; avx2 / avx512 (no VNNI): as portable; auto: this CPU")
