"""Arguments shared by the command-line tools (the scripts stay thin and say the same thing)."""
from __future__ import annotations

import argparse
import os
import sys

from lrformer_edge.artifacts.staging import (
    check_output_folder,
    check_replaceable_folder,
)
from lrformer_edge.backends import BACKENDS, backend_for, resolve_backend_options
from lrformer_edge.backends.base import Backend, RuntimeOption
from lrformer_edge.data.calibration import (
    DEFAULT_CALIBRATION_IMAGES,
    PROCEDURAL,
    build_calibration_set,
)
from lrformer_edge.files import check_output_file

# --validate without a number: held-out procedural scenes an export is compared on.
VALIDATION_IMAGES = 100


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
                              what: str = "int8",
                              images: int = DEFAULT_CALIBRATION_IMAGES) -> None:
    """--calib-data, --calib-images and --seed, the same for every command that calibrates.

    The default source is the command's own dataset where it has one (``default_source``
    names its flag, e.g. "--data"), else the procedural scenes. ``images``: the default count,
    DEFAULT_CALIBRATION_IMAGES unless a flow's memory rules it out (QAT: QAT_CALIBRATION_IMAGES)."""
    source = f"the images of {default_source}" if default_source else f"'{PROCEDURAL}'"
    parser.add_argument("--calib-data", metavar="SOURCE",
                        help=f"{what}: calibration images: dataset root, image folder, video or "
                             f"'{PROCEDURAL}' (default {source})")
    parser.add_argument("--calib-images", type=int, default=images, metavar="N",
                        help=f"{what}: calibration images (default {images})")
    parser.add_argument("--seed", type=int, default=0, help=f"{what}: calibration sampling seed")


def add_statistics_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """--statistics-cache FILE / --no-statistics-cache, for the exports that calibrate with
    NNCF (``lrformer_edge.backends.nncf_statistics``)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--statistics-cache", metavar="FILE",
                       help="int8: calibration statistics cache file (default: one per model, "
                            "input size and calibration set under $LRFORMER_EDGE_CACHE or "
                            "~/.cache/lrformer-edge); a file made for another export is refused")
    group.add_argument("--no-statistics-cache", action="store_true",
                       help="int8: run the statistics pass, neither reading nor writing a cache")


def check_calibration_arguments(parser: argparse.ArgumentParser, args, calibrates: bool = True,
                                what: str = "int8") -> None:
    """Refuse a calibration count below 1 and, for an export that does not calibrate
    (``calibrates=False``), a --calib-data that would be ignored (``what``: what calibrates,
    e.g. "--int8")."""
    if args.calib_images < 1:
        parser.error(f"--calib-images must be positive, got {args.calib_images}")
    if not calibrates and args.calib_data is not None:
        parser.error(f"--calib-data applies to {what} only")


def add_validate_argument(parser: argparse.ArgumentParser) -> None:
    """--validate [N], the same for every exporter (``lrformer_edge.export_flow``)."""
    parser.add_argument(
        "--validate", type=int, nargs="?", const=VALIDATION_IMAGES, metavar="N",
        help=f"after the export, run the artifact on N held-out procedural scenes and compare it "
             f"with the FP32 PyTorch model: mIoU, delta and pixel agreement (N default "
             f"{VALIDATION_IMAGES})")


def check_validate_argument(parser: argparse.ArgumentParser, args) -> None:
    if args.validate is not None and args.validate < 1:
        parser.error("--validate needs a positive number of images")


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


def add_backend_option_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per runtime option of every registered backend, spelt as the backend declares it
    (--openvino-precision, --emulate-exact-int8), for commands that run artifacts of several
    backends: a new backend's options appear without editing the command."""
    for backend in BACKENDS:
        for option in backend.runtime_options:
            _add_option(parser, backend.option_flag(option), _option_dest(backend, option),
                        option, option.choices, option.default)


def backend_options_from_args(args) -> dict[str, dict]:
    """backend name -> option -> value, from ``add_backend_option_arguments``'s flags."""
    return {backend.name: {option.name: getattr(args, _option_dest(backend, option))
                           for option in backend.runtime_options}
            for backend in BACKENDS if backend.runtime_options}


def add_runner_option_arguments(parser: argparse.ArgumentParser) -> None:
    """--<option> (e.g. --precision bf16) for commands that run one artifact: every runtime
    option some backend declares, for the backend that runs the artifact
    (``runner_options_from_args``). Unset, the runner's own default applies."""
    for name, owners in _options_by_name().items():
        option = owners[0][1]
        choices = tuple(dict.fromkeys(c for _, o in owners for c in o.choices))
        titles = ", ".join(backend.title for backend, _ in owners)
        _add_option(parser, _runner_flag(name), name, option, choices, None, f"{titles}: ")


def runner_options_from_args(args, artifact) -> dict:
    """The ``add_runner_option_arguments`` flags given, as options for the runner of
    ``artifact`` (None: no artifact). A flag its backend does not have is a ValueError."""
    given = {name: getattr(args, name) for name in _options_by_name()
             if getattr(args, name) not in (None, False)}
    backend = backend_for(artifact) if artifact is not None and given else None
    for name in given:
        if backend is None or name not in backend.option_defaults():
            owners = ", ".join(b.title for b, _ in _options_by_name()[name])
            raise ValueError(f"{_runner_flag(name)} applies to {owners} artifacts only, not to "
                             f"{artifact or 'the default PyTorch model'}")
    if backend is not None:
        resolve_backend_options({backend.name: given})  # a value this backend does not offer
    return given


def _options_by_name() -> dict[str, list[tuple[Backend, RuntimeOption]]]:
    owners: dict[str, list] = {}
    for backend in BACKENDS:
        for option in backend.runtime_options:
            owners.setdefault(option.name, []).append((backend, option))
    return owners


def _option_dest(backend: Backend, option: RuntimeOption) -> str:
    return f"{backend.name}_{option.name}"


def _runner_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_option(parser, flag: str, dest: str, option: RuntimeOption, choices, default,
                prefix: str = "") -> None:
    if option.is_switch:
        parser.add_argument(flag, dest=dest, action="store_true", help=prefix + option.help)
    else:
        parser.add_argument(flag, dest=dest, choices=choices, default=default,
                            help=f"{prefix}{option.help} (default {option.default})")


def add_precision_config_argument(parser: argparse.ArgumentParser, applies_to: str) -> None:
    """--precision-config FILE, the same for every exporter (``applies_to``: the precisions it
    applies to, e.g. "--precision int8")."""
    parser.add_argument(
        "--precision-config", metavar="FILE",
        help=f"{applies_to}: layers to keep in higher precision, as chosen by "
             f"calibration/sensitivity.py (a JSON precision config; recorded in the artifact)")


def precision_config_from_args(args):
    """The --precision-config file, read and checked for form (None when not given); whether it
    fits the model is checked by the exporter."""
    from lrformer_edge.artifacts.precision_config import PrecisionConfig

    path = getattr(args, "precision_config", None)
    return PrecisionConfig.load(path) if path else None
