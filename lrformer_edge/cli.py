"""Arguments shared by the command-line tools (the scripts stay thin and say the same thing)."""
from __future__ import annotations

import argparse
import os
import sys

from lrformer_edge.artifacts.staging import check_output_folder, check_replaceable_folder
from lrformer_edge.data.calibration import (
    DEFAULT_CALIBRATION_IMAGES,
    PROCEDURAL,
    build_calibration_set,
)
from lrformer_edge.files import check_output_file


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
    if path is None:
        return
    check = {"file": check_output_file, "folder": check_output_folder,
             "artifact-folder": check_replaceable_folder}[kind]
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


def add_calibration_arguments(parser: argparse.ArgumentParser, default_source: str | None = None,
                              what: str = "int8") -> None:
    """--calib-data, --calib-images and --seed, the same for every command that calibrates.

    The default source is the command's own dataset where it has one (``default_source``
    names its flag, e.g. "--data"), else the procedural scenes."""
    source = f"the images of {default_source}" if default_source else f"'{PROCEDURAL}'"
    parser.add_argument("--calib-data", metavar="SOURCE",
                        help=f"{what}: calibration images: dataset root, image folder, video or "
                             f"'{PROCEDURAL}' (default {source})")
    parser.add_argument("--calib-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                        metavar="N",
                        help=f"{what}: calibration images (default {DEFAULT_CALIBRATION_IMAGES})")
    parser.add_argument("--seed", type=int, default=0, help=f"{what}: calibration sampling seed")


def check_calibration_arguments(parser: argparse.ArgumentParser, args) -> None:
    if args.calib_images < 1:
        parser.error(f"--calib-images must be positive, got {args.calib_images}")


def calibration_source(args, dataset: str | None = None) -> str:
    """The one meaning of the default: the command's dataset, else the procedural scenes."""
    return args.calib_data or dataset or PROCEDURAL


def calibration_from_args(args, data_config, input_size, dataset: str | None = None, log=print):
    """The calibration set the arguments ask for, described in one line."""
    source = calibration_source(args, dataset)
    calibration = build_calibration_set(source, data_config, input_size, args.calib_images,
                                        args.seed)
    log(f"calibration set: {len(calibration.batches)} images from {source}, "
        f"sha256 {calibration.sha256[:16]}...")
    return calibration
