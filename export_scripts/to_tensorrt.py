"""Export LRFormer to a TensorRT engine: a TensorRT-ready ONNX (any machine), then the engine
(where TensorRT and an NVIDIA GPU exist).

    python export_scripts/to_tensorrt.py --int8 --onnx-only           # here: Q/DQ ONNX only
    python export_scripts/to_tensorrt.py --int8 --output lrformer-int8.engine --validate
    python export_scripts/to_tensorrt.py --from-onnx lrformer-int8.onnx --int8 \\
        --timing-cache trt.cache --output lrformer-int8.engine        # on the Jetson

--int8 is explicit quantization (TensorRT 10.1 deprecated and 11 removed implicit calibration):
a Q/DQ ONNX from NNCF post-training calibration on --calib-images real images (symmetric int8,
zero-points 0, per-channel weights, per-tensor activations; LayerNorm, Softmax and the resizes in
float). --fp16 writes an FP16 ONNX with LayerNorm/Softmax/Resize and I/O in FP32. Engines are
built strongly typed, so the ONNX's types are what runs on TensorRT 10.x and 11.x alike.

The ONNX is written next to --output (same name, .onnx) after it passed the structural checks and
a comparison with PyTorch in ONNX Runtime. Without TensorRT or a GPU the script then stops with
exit code 3 and prints the command to run on the target; --onnx-only makes that a success.
--validate [N] compares the result (the engine, or the ONNX in ONNX Runtime with --onnx-only)
with the FP32 PyTorch model on N held-out procedural scenes: mIoU, delta and pixel agreement.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from lrformer_edge.artifacts.result import run_export_cli
from lrformer_edge.cli import add_model_arguments, check_output_argument
from lrformer_edge.resources import check_export_size

TENSORRT_MISSING_EXIT = 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    precision = parser.add_mutually_exclusive_group(required=True)
    for name in ("int8", "fp16", "fp32"):
        precision.add_argument(f"--{name}", dest="precision", action="store_const", const=name)
    parser.add_argument("--calib-data", help="int8: dataset root, image folder, or 'procedural' "
                                             "(default); with --from-onnx: checked against the "
                                             "set the ONNX was calibrated with")
    parser.add_argument("--calib-images", type=int, default=300, help="int8: calibration images")
    parser.add_argument("--seed", type=int, default=0, help="int8: calibration sampling seed")
    parser.add_argument("--qat-checkpoint", type=Path, metavar="CKPT",
                        help="int8: take Q/DQ from a QAT checkpoint of calibration/qat.py "
                             "instead of post-training calibration")
    parser.add_argument("--onnx-only", action="store_true",
                        help="stop after the TensorRT-ready ONNX (success without TensorRT)")
    parser.add_argument("--from-onnx", type=Path, help="build from an ONNX written by step 1")
    parser.add_argument("--workspace", type=int, metavar="MiB", help="builder workspace limit")
    parser.add_argument("--dla-core", type=int, metavar="N", help="DLA core (Jetson), GPU fallback")
    parser.add_argument("--timing-cache", type=Path, metavar="FILE",
                        help="read (if present) and update this timing cache")
    parser.add_argument("--validate", type=int, nargs="?", const=100, metavar="N",
                        help="compare with FP32 PyTorch on N procedural scenes (default 100)")
    parser.add_argument("--verbose", action="store_true", help="TensorRT builder log")
    parser.add_argument("--output", type=Path, help="engine file (default lrformer-PRECISION.engine)")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = Path(f"lrformer-{args.precision}.engine")
    if args.output.suffix not in (".engine", ".plan"):
        parser.error(f"--output must end in .engine or .plan, got {args.output}")
    if args.calib_images < 1:
        parser.error("--calib-images must be positive")
    if args.precision != "int8" and args.calib_data:
        parser.error("--calib-data applies to --int8 only")
    if args.from_onnx and args.input_size:
        parser.error("--input-size is fixed by the ONNX given with --from-onnx")
    if args.qat_checkpoint and (args.precision != "int8" or args.from_onnx or args.calib_data
                                or args.input_size):
        parser.error("--qat-checkpoint goes with --int8 only (its input size and quantizers come "
                     "from the checkpoint; no --from-onnx, --calib-data or --input-size)")
    if args.validate is not None and args.validate < 1:
        parser.error("--validate needs a positive number of images")
    check_output_argument(args.output, "--output")
    if not args.from_onnx:
        check_output_argument(_onnx_path(args), "the ONNX next to --output")
    check_output_argument(args.timing_cache, "--timing-cache")
    return args


def _onnx_path(args) -> Path:
    return args.from_onnx or args.output.with_suffix(".onnx")


def _model(args):
    from lrformer_edge.models.factory import create_model

    return create_model(args.variant, checkpoint=args.checkpoint)


def _calibration(args, data_config, size):
    from lrformer_edge.data.calibration import build_calibration_set

    calibration = build_calibration_set(args.calib_data or "procedural", data_config, size,
                                        args.calib_images, args.seed)
    print(f"calibration set: {len(calibration.batches)} images from "
          f"{args.calib_data or 'procedural'}, sha256 {calibration.sha256[:16]}...")
    return calibration


def step_onnx(args):
    """Write (or check, with --from-onnx) the TensorRT-ready ONNX; returns its metadata."""
    from lrformer_edge.backends.onnxruntime.format import read_onnx_metadata
    from lrformer_edge.backends.tensorrt.export import (
        check_calibration_matches,
        export_tensorrt_onnx,
    )

    if args.from_onnx:
        if not args.from_onnx.is_file():
            raise ValueError(f"--from-onnx {args.from_onnx} does not exist")
        metadata = read_onnx_metadata(args.from_onnx)
        if metadata.get("target") != "tensorrt":
            raise ValueError(f"{args.from_onnx} was not written by to_tensorrt.py (no "
                             f"'target: tensorrt' in its metadata); export it with --onnx-only")
        if metadata.get("precision") != args.precision:
            raise ValueError(f"{args.from_onnx} is a {metadata.get('precision')} ONNX, but "
                             f"--{args.precision} was asked for")
        if args.calib_data:
            from lrformer_edge.artifacts.metadata import data_config_from_metadata

            data = data_config_from_metadata(metadata)
            check_calibration_matches(args.from_onnx, _calibration(args, data,
                                                                   metadata["input_size"]))
            print("calibration data matches the set recorded in the ONNX")
        return metadata
    if args.qat_checkpoint:
        return _qat_onnx(args)
    model = _model(args)
    size = tuple(args.input_size) if args.input_size else model.config.data.native_size
    size = check_export_size(model, size, args.calib_images if args.precision == "int8" else 0)
    calibration = _calibration(args, model.config.data, size) if args.precision == "int8" else None
    print(f"exporting {model.config.name} at {size[0]}x{size[1]} to a {args.precision} "
          f"TensorRT ONNX")
    result = export_tensorrt_onnx(model, _onnx_path(args), size, args.precision, calibration)
    print(result.summary())
    quantization = result.metadata.get("quantization")
    if quantization:
        print(f"Q/DQ: {quantization['activation_quantizers']} per-tensor activation quantizers, "
              f"{quantization['int8_weights']} int8 weights ({quantization['per_channel_weights']}"
              f" per-channel), zero-points 0, operators all in TensorRT 10's ONNX matrix")
    return result.metadata


def _qat_onnx(args) -> dict:
    from lrformer_edge.data.calibration import build_calibration_set
    from lrformer_edge.quant.qat import export_qat_qdq_onnx, restore

    quantized, payload = restore(args.qat_checkpoint)
    size = tuple(payload["input_size"])
    print(f"exporting the QAT model {args.qat_checkpoint} ({payload['variant']}, "
          f"{size[0]}x{size[1]}, iteration {payload['iteration']}) to a Q/DQ TensorRT ONNX")
    feed = build_calibration_set("procedural", quantized.config.data, size, 1, seed=123).batches[0]
    result = export_qat_qdq_onnx(quantized, payload, _onnx_path(args), feed)
    print(result.summary().replace("parity vs PyTorch", "parity vs the QAT fake-quant model"))
    return result.metadata


def validate(args, pipeline, name: str, metadata: dict) -> None:
    from lrformer_edge.evaluation import (
        against_ground_truth,
        describe_against_ground_truth,
        procedural_validation_samples,
    )

    model = _model(args)
    if args.qat_checkpoint and not args.checkpoint and metadata.get("variant") != args.variant:
        raise ValueError(f"the QAT model is a {metadata.get('variant')}; name --variant (and "
                         f"--checkpoint) of its FP32 model for --validate")
    if (model.checkpoint_sha256 or "none (untrained)") != metadata.get("checkpoint_sha256"):
        raise ValueError(f"--validate compares with the PyTorch model the artifact was exported "
                         f"from; the artifact records checkpoint {metadata.get('checkpoint_sha256')}"
                         f", the given --variant/--checkpoint is {model.checkpoint_sha256}")
    size = tuple(metadata["input_size"])
    result = against_ground_truth(model, pipeline, procedural_validation_samples(args.validate,
                                                                                 size), size)
    print(describe_against_ground_truth(result, name))


def target_command(args) -> str:
    command = ["python", "export_scripts/to_tensorrt.py", "--from-onnx", str(_onnx_path(args)),
               f"--{args.precision}", "--output", str(args.output)]
    for flag, value in (("--workspace", args.workspace), ("--dla-core", args.dla_core),
                        ("--timing-cache", args.timing_cache)):
        if value is not None:
            command += [flag, str(value)]
    if args.validate:  # validation on the target compares with the same PyTorch model
        command += ["--validate", str(args.validate), "--variant", args.variant]
        command += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    return " ".join(shlex.quote(part) for part in command)


def main(argv=None) -> int:
    args = parse_args(argv)
    code, metadata = run_export_cli(lambda: step_onnx(args))
    if code:
        return code
    onnx_path = _onnx_path(args)
    if args.onnx_only:
        if args.validate:
            from lrformer_edge.artifacts.metadata import data_config_from_metadata
            from lrformer_edge.backends.onnxruntime.runner import OnnxRuntimeRunner
            from lrformer_edge.pipeline import SegmentationPipeline

            pipeline = SegmentationPipeline(
                OnnxRuntimeRunner(onnx_path, providers=["CPUExecutionProvider"]),
                data_config_from_metadata(metadata))
            code, _ = run_export_cli(lambda: validate(args, pipeline,
                                                      f"{args.precision} ONNX (ONNX Runtime CPU)",
                                                      metadata))
        return code
    return step_engine(args, onnx_path, metadata)


def step_engine(args, onnx_path: Path, metadata: dict) -> int:
    from lrformer_edge.backends.tensorrt.engine import (
        EngineOptions,
        TensorRTUnavailable,
        TimingCacheMismatch,
        build_engine,
    )

    options = EngineOptions(args.workspace, args.dla_core, args.timing_cache, args.verbose)
    try:
        result = build_engine(onnx_path, args.output, options)
    except TensorRTUnavailable as missing:
        print(f"TensorRT engine NOT built: {missing}.\n"
              f"The TensorRT-ready ONNX is in place: {onnx_path}\n"
              f"On the target (Jetson with JetPack 6/7, or an x86 machine with an NVIDIA GPU and "
              f"TensorRT 10.x/11.x), run:\n    {target_command(args)}\n"
              f"(add --onnx-only here to treat writing the ONNX as success)", file=sys.stderr)
        return TENSORRT_MISSING_EXIT
    except (TimingCacheMismatch, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.validate:
        from lrformer_edge.pipeline import SegmentationPipeline

        code, _ = run_export_cli(lambda: validate(
            args, SegmentationPipeline.from_artifact(args.output),
            f"TensorRT {args.precision} engine", metadata))
        return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
