"""TensorRT target in two steps.

1. ``export_tensorrt_onnx`` (any machine): the deploy form to a TensorRT-ready ONNX.
   * fp32: the parity-checked ONNX of ``export_onnx``.
   * fp16: FP16 weights and activations, with LayerNorm, Softmax and Resize kept in FP32 and FP32
     inputs/outputs (TensorRT 11 builds what the ONNX types say: FP16 means an FP16 ONNX).
   * int8: explicit quantization, Q/DQ from NNCF post-training calibration (``quant.qdq``).
   Every file is structurally checked (operators in TensorRT 10's ONNX support matrix, opset
   <= 20, int8 Q/DQ with zero-points 0), compared with PyTorch through ONNX Runtime, and only then
   moved into place.
2. ``build_engine`` (where TensorRT and an NVIDIA GPU exist): strongly typed network (types come
   from the ONNX, the only mode TensorRT 11 has), workspace limit, timing cache (refused when it
   was made by another TensorRT/GPU), optional DLA core with GPU fallback; the engine is written
   with a JSON sidecar naming the TensorRT version, GPU, the ONNX's SHA-256 and the calibration
   set's hash.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lrformer_edge.export.metadata import METADATA_PREFIX, artifact_metadata, decode_metadata
from lrformer_edge.export.onnx import (
    ArtifactCheckError,
    MAX_OPSET,
    ExportResult,
    ParityThresholds,
    check_parity,
    export_onnx,
    op_histogram,
    parity_inputs,
    parity_thresholds,
    read_onnx_metadata,
)
from lrformer_edge.files import atomic_write, check_output_file, file_sha256

TRT_PRECISIONS = ("fp32", "fp16", "int8")
FP16_FLOAT_OPS = ("LayerNormalization", "Softmax", "Resize")
SIDECAR_SUFFIX = ".json"


class TensorRTUnavailable(RuntimeError):
    """TensorRT or an NVIDIA GPU is missing on this machine (the ONNX is still written)."""


class TimingCacheMismatch(ValueError):
    """A timing cache made by another TensorRT version or GPU."""


def tensorrt_problems(graph) -> list[str]:
    """Why TensorRT 10.x/11.x would not take this ONNX: operators, opset, Q/DQ form."""
    from lrformer_edge.export.trt_ops import unsupported_ops
    from lrformer_edge.quant.qdq import qdq_problems

    problems = [f"operator {op} is not in TensorRT 10's ONNX support matrix"
                for op in unsupported_ops(graph)]
    opsets = [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")]
    if opsets and max(opsets) > MAX_OPSET:
        problems.append(f"opset {max(opsets)} > {MAX_OPSET} (newest TensorRT 10.x parses)")
    return problems + qdq_problems(graph)


def require_tensorrt_form(graph, what: str) -> None:
    """Raise ``ArtifactCheckError`` (nothing gets written) when TensorRT would not take it."""
    problems = tensorrt_problems(graph)
    if problems:
        raise ArtifactCheckError(f"{what} is not in the form TensorRT takes: "
                                 + "; ".join(problems[:5]))


def fold_constants(path: Path, folded: Path):
    """Constant-fold with ONNX Runtime's basic level (standard ONNX rewrites only): the pooling
    matrices and reshaped weights become initializers, so Q/DQ on them is recognisably weight
    quantization and TensorRT sees no Shape/Gather arithmetic."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    # On Q/DQ graphs ONNX Runtime would also quantize biases to int32 DequantizeLinear nodes,
    # which TensorRT does not take.
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["WeightBiasQuantization"])
    graph = onnx.load(str(folded))
    used = {node.domain for node in graph.graph.node} | {""}
    kept = [o for o in graph.opset_import if o.domain in used]
    del graph.opset_import[:]
    graph.opset_import.extend(kept)
    return graph


def to_fp16(graph):
    """FP16 ONNX for TensorRT: FP32 I/O and FP32 LayerNorm/Softmax/Resize."""
    from lrformer_edge.runners.base import require

    float16 = require("onnxruntime.transformers.float16", "dev", "FP16 ONNX conversion")
    converted = float16.convert_float_to_float16(graph, keep_io_types=True,
                                                 op_block_list=list(FP16_FLOAT_OPS))
    return topologically_sorted(converted)  # the converter appends the input casts last


def topologically_sorted(graph):
    """Reorder nodes so each comes after the producers of its inputs (ONNX requires it)."""
    available = {i.name for i in graph.graph.input} | {i.name for i in graph.graph.initializer}
    available.add("")  # omitted optional inputs
    pending, ordered = list(graph.graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ArtifactCheckError(f"the graph has a cycle or a dangling input near "
                                     f"{pending[0].name}")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for node in ready:
            ordered.append(node)
            available.update(node.output)
    del graph.graph.node[:]
    graph.graph.node.extend(ordered)
    return graph


def export_tensorrt_onnx(model, output: str | Path, input_size=None, precision: str = "int8",
                         calibration=None, parity: ParityThresholds | None = None) -> ExportResult:
    """Write the TensorRT-ready ONNX for ``precision`` at ``output`` (checked, then renamed)."""
    import onnx

    from lrformer_edge.models.deploy import check_input_size

    if precision not in TRT_PRECISIONS:
        raise ValueError(f"precision must be one of {TRT_PRECISIONS}, got {precision!r}")
    if (precision == "int8") != (calibration is not None):
        raise ValueError("int8 needs a calibration set; fp32/fp16 take none")
    input_size = check_input_size(input_size or model.config.data.native_size)
    output = Path(output)
    if output.suffix != ".onnx":
        raise ValueError(f"output must end in .onnx, got {output}")
    check_output_file(output)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="lrformer-trt-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", input_size)
        graph = fold_constants(fp32.path, Path(tmp) / "folded.onnx")
        quantization = {}
        if precision == "fp16":
            graph = to_fp16(graph)
        elif precision == "int8":
            from lrformer_edge.quant.qdq import quantize_qdq, qdq_summary

            graph, quantization = quantize_qdq(graph, calibration)
            quantization["quantization"].update(qdq_summary(graph))
        metadata = artifact_metadata(
            model, input_size, format="onnx", target="tensorrt", precision=precision,
            opset=max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            batch_size=1, fp32_onnx_parity=fp32.parity.as_dict(), **quantization)
        del graph.metadata_props[:]
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        require_tensorrt_form(graph, "the TensorRT ONNX")
        try:
            onnx.checker.check_model(graph)
        except onnx.checker.ValidationError as error:
            raise ArtifactCheckError(f"the {precision} ONNX is invalid: {error}") from None
        staged = Path(tmp) / "staged.onnx"
        onnx.save(graph, str(staged))
        agreement = _check(model, staged, input_size, precision, calibration, parity)
        atomic_write(output, lambda path: Path(path).write_bytes(staged.read_bytes()))
    return ExportResult(output, agreement, time.time() - start, op_histogram(graph),
                        decode_metadata(metadata))


def _check(model, path, input_size, precision, calibration, parity):
    from lrformer_edge.models.deploy import to_deploy
    from lrformer_edge.runners.onnxruntime import OnnxRuntimeRunner

    thresholds = parity or parity_thresholds(precision)
    feed = calibration.batches[0] if precision == "int8" else parity_inputs(input_size)
    runner = OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"])
    return check_parity(to_deploy(model, input_size), runner, feed, thresholds,
                        f"{precision} TensorRT ONNX")


# --------------------------------------------------------------------------- step 2: engine
def tensorrt_unavailable_reason() -> str | None:
    """None when an engine can be built here, else what is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("the Python package 'tensorrt' is not installed (x86: pip install tensorrt; "
                "Jetson: use the system TensorRT from JetPack, in a venv made with "
                "--system-site-packages)")
    from lrformer_edge.runners.tensorrt import cuda_gpu_name

    if cuda_gpu_name() is None:
        return ("no NVIDIA GPU visible to CUDA (checked with cuda-python, else PyTorch; "
                "pip install cuda-python on the target)")
    return None


@dataclass
class EngineOptions:
    workspace_mib: int | None = None
    dla_core: int | None = None
    timing_cache: Path | None = None
    verbose: bool = False


@dataclass
class EngineResult:
    path: Path
    sidecar: dict
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        size = self.path.stat().st_size / 2**20
        lines = [f"wrote {self.path} ({size:.1f} MiB, TensorRT {self.sidecar['tensorrt_version']}, "
                 f"{self.sidecar['gpu']}, {self.seconds:.1f} s) and {sidecar_path(self.path).name}"]
        return "\n".join(lines + self.notes)


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + SIDECAR_SUFFIX)


def read_sidecar(engine: str | Path) -> dict:
    path = sidecar_path(engine)
    if not path.is_file():
        raise ValueError(f"{engine} has no sidecar {path.name}; engines built by lrformer-edge "
                         f"carry one (metadata, TensorRT version, GPU)")
    return json.loads(path.read_text())


def engine_sidecar(onnx_path: Path, tensorrt_version: str, gpu: str, options: EngineOptions,
                   strongly_typed: bool) -> dict:
    metadata = read_onnx_metadata(onnx_path)
    calibration = metadata.get("calibration_set") or {}
    return {
        "metadata": {METADATA_PREFIX + k: v if isinstance(v, str) else json.dumps(v)
                     for k, v in metadata.items()},
        "tensorrt_version": tensorrt_version, "gpu": gpu,
        "onnx": onnx_path.name, "onnx_sha256": file_sha256(onnx_path),
        "precision": metadata.get("precision", "fp32"),
        "calibration_sha256": calibration.get("sha256"),
        "strongly_typed": strongly_typed, "workspace_mib": options.workspace_mib,
        "dla_core": options.dla_core,
        "timing_cache": str(options.timing_cache) if options.timing_cache else None,
    }


def build_engine(onnx_path: str | Path, engine_path: str | Path,
                 options: EngineOptions | None = None) -> EngineResult:
    """Build and serialise an engine from a TensorRT-ready ONNX written by step 1."""
    reason = tensorrt_unavailable_reason()
    if reason:
        raise TensorRTUnavailable(reason)
    import tensorrt as trt

    from lrformer_edge.runners.tensorrt import cuda_gpu_name

    options = options or EngineOptions()
    onnx_path, engine_path = Path(onnx_path), check_output_file(engine_path)
    start = time.time()
    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: the ONNX's types decide each layer's precision (Q/DQ for int8, FP16 tensors
    # for fp16). TensorRT 11 has no other mode; on 10.x it keeps LayerNorm/Softmax in FP32.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.dla_core is not None:
        if builder.num_DLA_cores <= options.dla_core:
            raise ValueError(f"DLA core {options.dla_core} requested, this device has "
                             f"{builder.num_DLA_cores} (Jetson AGX Orin/Xavier have 2, GPUs 0)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache = _attach_timing_cache(config, options.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (run with "
                           f"--verbose for the builder log)")
    sidecar = engine_sidecar(onnx_path, trt.__version__, cuda_gpu_name(), options,
                             strongly_typed=True)
    atomic_write(engine_path, lambda path: Path(path).write_bytes(bytes(serialized)))
    atomic_write(sidecar_path(engine_path),
                 lambda path: Path(path).write_text(json.dumps(sidecar, indent=2)))
    notes = []
    if options.timing_cache is not None:
        data = bytes(cache.serialize())
        atomic_write(options.timing_cache, lambda path: Path(path).write_bytes(data))
        notes.append(f"timing cache saved to {options.timing_cache}")
    return EngineResult(engine_path, sidecar, time.time() - start, notes)


def _attach_timing_cache(config, path: Path | None):
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise TimingCacheMismatch(
            f"timing cache {path} was made by another TensorRT version or GPU; delete it or "
            f"pass another --timing-cache path")
    return cache


def check_calibration_matches(onnx_path: Path, calibration) -> None:
    """Refuse calibration data that is not the set the Q/DQ ONNX was calibrated with."""
    recorded = (read_onnx_metadata(onnx_path).get("calibration_set") or {}).get("sha256")
    if recorded is None:
        raise ValueError(f"{onnx_path} records no calibration set (not an int8 Q/DQ ONNX from "
                         f"lrformer-edge); leave out --calib-data")
    if recorded != calibration.sha256:
        raise ValueError(f"calibration data does not match {onnx_path.name}: it was calibrated "
                         f"with set {recorded[:16]}..., the given data hashes to "
                         f"{calibration.sha256[:16]}... (same source, --calib-images and --seed "
                         f"give the same set)")

