"""``export_scripts/to_tensorrt.py`` after its arguments are parsed, run by
``lrformer_edge.export_flow.run_command`` with an ``ExportSession`` (the shared steps: model,
input size, calibration set, QAT restore, --validate).

1. The TensorRT-ready ONNX: exported here (post-training Q/DQ, or a QAT checkpoint's quantizers),
   or with --from-onnx one written before, checked: it must be a TensorRT ONNX of the precision
   asked for, and --calib-data must give the set it was calibrated with.
2. The engine where TensorRT and an NVIDIA GPU exist; elsewhere exit code 3 and the command that
   builds it on the target (--onnx-only: the ONNX is the end, exit code 0).
--validate compares what was made (the engine, or with --onnx-only the ONNX in ONNX Runtime's CPU
provider) with the FP32 PyTorch model it was exported from.
"""
from __future__ import annotations

import sys
from pathlib import Path

from lrformer_edge.artifacts.metadata import data_config_from_metadata
from lrformer_edge.artifacts.result import INPUT_ERROR_EXIT, run_export_cli
from lrformer_edge.backends.nncf_statistics import statistics_cache_from_args
from lrformer_edge.backends.tensorrt.engine import (
    EngineOptions,
    TensorRTUnavailable,
    TimingCacheMismatch,
    build_engine,
    check_engine_onnx,
    engine_not_built,
    onnx_path_for,
    target_command,
)
from lrformer_edge.backends.tensorrt.export import (
    check_calibration_matches,
    export_qat_qdq_onnx,
    export_tensorrt_onnx,
)
from lrformer_edge.backends.tensorrt.precisions import (
    recorded_layer_precisions,
    trtexec_command,
)

ENGINE_NOT_BUILT_EXIT = 3  # TensorRT or a GPU is missing here; the ONNX for the target is written


def tensorrt_command(session, precision_config=None) -> int:
    """The exit code of to_tensorrt.py for ``session.args`` (see the module);
    ``precision_config``: the ``PrecisionConfig`` of --precision-config (int8)."""
    args = session.args
    code, done = run_export_cli(lambda: _onnx_step(session, precision_config))
    if done is None:
        return code
    metadata, model = done
    onnx_path = args.from_onnx or onnx_path_for(args.output)
    if args.onnx_only:
        return _validate(session, model, metadata, onnx_path,
                         f"{args.precision} ONNX (ONNX Runtime CPU)",
                         providers=["CPUExecutionProvider"])
    options = EngineOptions(args.workspace, args.dla_core, args.timing_cache, args.verbose)
    try:
        result = build_engine(onnx_path, args.output, options)
    except TensorRTUnavailable as missing:
        command = target_command(onnx_path, args.precision, args.output, options,
                                 _target_validation_args(args))
        print(engine_not_built(str(missing), onnx_path, command,
                               _trtexec_line(onnx_path, args.output, metadata)), file=sys.stderr)
        return ENGINE_NOT_BUILT_EXIT
    except (TimingCacheMismatch, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return INPUT_ERROR_EXIT
    session.log(result.summary())
    return _validate(session, model, metadata, args.output, f"TensorRT {args.precision} engine")


def _trtexec_line(onnx_path: Path, engine_path: Path, metadata: dict) -> str | None:
    """The trtexec line of an ONNX with a layer-precision list (None without one)."""
    precisions = recorded_layer_precisions(metadata)
    return trtexec_command(onnx_path, engine_path, precisions) if precisions else None


def _onnx_step(session, precision_config=None) -> tuple[dict, object]:
    """(metadata of the TensorRT-ready ONNX, the PyTorch model exported here or None)."""
    args = session.args
    if args.from_onnx:
        metadata = check_engine_onnx(args.from_onnx, args.precision)
        if args.calib_data:
            calibration = session.calibration(data_config_from_metadata(metadata),
                                              metadata["input_size"])
            check_calibration_matches(args.from_onnx, calibration)
            session.log("calibration data matches the set recorded in the ONNX")
        return metadata, None
    if args.qat_checkpoint:
        return _qat_onnx(session), None
    model = session.load_model()
    int8 = args.precision == "int8"
    size = session.input_size(model, calibrates=int8)
    calibration = session.calibration(model.config.data, size) if int8 else None
    session.log(f"exporting {model.config.name} at {size[0]}x{size[1]} to a {args.precision} "
                f"TensorRT ONNX")
    result = export_tensorrt_onnx(model, onnx_path_for(args.output), size, args.precision,
                                  calibration,
                                  statistics_cache=statistics_cache_from_args(args),
                                  precision_config=precision_config)
    session.log(result.summary())
    quantization = result.metadata.get("quantization")
    if quantization:
        session.log(f"Q/DQ: {quantization['activation_quantizers']} per-tensor activation "
                    f"quantizers, {quantization['int8_weights']} int8 weights "
                    f"({quantization['per_channel_weights']} per-channel), zero-points 0, "
                    f"operators all in TensorRT 10's ONNX matrix")
    float_nodes = result.metadata.get("float_layer_nodes")
    if float_nodes:
        # Without --onnx-only the trtexec line comes with the engine build's outcome.
        trtexec = (f"; with TensorRT 10.x's trtexec:\n    "
                   f"{_trtexec_line(onnx_path_for(args.output), args.output, result.metadata)}"
                   if args.onnx_only else "")
        session.log(f"precision config: {len(float_nodes)} layer(s) kept in float "
                    f"({sum(map(len, float_nodes.values()))} ONNX node(s) without Q/DQ); the "
                    f"ONNX records their layer-precision list for the engine build{trtexec}")
    return result.metadata, model


def _qat_onnx(session) -> dict:
    args = session.args
    quantized, payload, feed = session.restore_qat(args.qat_checkpoint)
    size = tuple(payload["input_size"])
    session.log(f"exporting the QAT model {args.qat_checkpoint} ({payload['variant']}, "
                f"{size[0]}x{size[1]}, iteration {payload['iteration']}) to a Q/DQ TensorRT ONNX")
    result = export_qat_qdq_onnx(quantized, payload, onnx_path_for(args.output), feed)
    session.log(result.summary().replace("parity vs PyTorch",
                                         "parity vs the QAT fake-quant model"))
    return result.metadata


def _validate(session, model, metadata: dict, artifact: Path, name: str,
              **runner_options) -> int:
    """--validate against the model exported here, else (--from-onnx, --qat-checkpoint) the FP32
    model that --variant/--checkpoint name."""
    args = session.args
    if not args.validate:
        return 0
    if model is None:
        if args.qat_checkpoint and not args.checkpoint and metadata.get("variant") != args.variant:
            print(f"error: the QAT model is a {metadata.get('variant')}; name --variant (and "
                  f"--checkpoint) of its FP32 model for --validate", file=sys.stderr)
            return INPUT_ERROR_EXIT
        code, model = run_export_cli(session.load_model)
        if model is None:
            return code
    return session.validate(model, artifact, name, **runner_options)


def _target_validation_args(args) -> list[str]:
    """--validate on the target compares with the same PyTorch model."""
    if not args.validate:
        return []
    return (["--validate", str(args.validate), "--variant", args.variant]
            + (["--checkpoint", args.checkpoint] if args.checkpoint else []))
