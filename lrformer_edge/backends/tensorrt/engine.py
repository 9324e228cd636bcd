"""Building a TensorRT engine from a TensorRT-ready ONNX (where TensorRT and an NVIDIA GPU exist)."""
from __future__ import annotations

import json
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lrformer_edge.artifacts.metadata import METADATA_PREFIX
from lrformer_edge.backends.onnxruntime.format import read_onnx_metadata
from lrformer_edge.backends.tensorrt.cuda import RUNTIME_INSTALL, cuda_gpu_name
from lrformer_edge.backends.tensorrt.precisions import (
    FLOAT_LAYER_PRECISION,
    LAYER_PRECISIONS_KEY,
    apply_layer_precisions,
    builds_weakly_typed,
    recorded_layer_precisions,
)
from lrformer_edge.backends.tensorrt.sidecar import sidecar_path
from lrformer_edge.files import atomic_write, check_output_file, file_sha256
from lrformer_edge.progress import heartbeat

ENGINE_SUFFIXES = (".engine", ".plan")
# The command that builds an engine from a TensorRT-ready ONNX on the target.
TARGET_SCRIPT = "export_scripts/to_tensorrt.py"


class TensorRTUnavailable(RuntimeError):
    """TensorRT or an NVIDIA GPU is missing on this machine (the ONNX is still written)."""


class TimingCacheMismatch(ValueError):
    """A timing cache made by another TensorRT version or GPU."""


@dataclass
class EngineOptions:
    workspace_mib: int | None = None
    dla_core: int | None = None
    timing_cache: Path | None = None
    verbose: bool = False


# --------------------------------------------------------------------------- step 2: engine
def tensorrt_unavailable_reason() -> str | None:
    """None when an engine can be built here, else what is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"the Python package 'tensorrt' is not installed; install: {RUNTIME_INSTALL}"
    if cuda_gpu_name() is None:
        return (f"no NVIDIA GPU visible to CUDA (checked with cuda-python, else PyTorch; "
                f"cuda-python comes with {RUNTIME_INSTALL})")
    return None


def onnx_path_for(engine_path: str | Path) -> Path:
    """Where step 1 writes the TensorRT-ready ONNX of an engine: beside it, same name, .onnx."""
    return Path(engine_path).with_suffix(".onnx")


def check_engine_onnx(path: str | Path, precision: str) -> dict:
    """The metadata of a TensorRT-ready ONNX of ``precision`` written by ``export_tensorrt_onnx``
    (``to_tensorrt.py --onnx-only``); a ValueError for any other file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--from-onnx {path} does not exist")
    metadata = read_onnx_metadata(path)
    if metadata.get("target") != "tensorrt":
        raise ValueError(f"{path} was not written by to_tensorrt.py (no 'target: tensorrt' in its "
                         f"metadata); export it with --onnx-only")
    if metadata.get("precision") != precision:
        raise ValueError(f"{path} is a {metadata.get('precision')} ONNX, but --{precision} was "
                         f"asked for")
    return metadata


def target_command(onnx_path: str | Path, precision: str, engine_path: str | Path,
                   options: EngineOptions, extra_args: Sequence[str] = ()) -> str:
    """The shell command that builds the engine from ``onnx_path`` on the target machine."""
    command = ["python", TARGET_SCRIPT, "--from-onnx", str(onnx_path), f"--{precision}",
               "--output", str(engine_path)]
    for flag, value in (("--workspace", options.workspace_mib), ("--dla-core", options.dla_core),
                        ("--timing-cache", options.timing_cache)):
        if value is not None:
            command += [flag, str(value)]
    return " ".join(shlex.quote(part) for part in [*command, *extra_args])


def engine_not_built(reason: str, onnx_path: str | Path, command: str,
                     trtexec: str | None = None) -> str:
    """What to tell a user on a machine that cannot build the engine: why, and what to run on
    the target with the ONNX that is in place (``trtexec``: the trtexec line of an ONNX with a
    layer-precision list, ``precisions.trtexec_command``)."""
    alternative = (f"or, with TensorRT 10.x's trtexec (the float layers in FP16):\n    "
                   f"{trtexec}\n" if trtexec else "")
    return (f"TensorRT engine NOT built: {reason}.\n"
            f"The TensorRT-ready ONNX is in place: {onnx_path}\n"
            f"On the target (Jetson with JetPack 6/7, or an x86 machine with an NVIDIA GPU and "
            f"TensorRT 10.x/11.x), run:\n    {command}\n{alternative}"
            f"(add --onnx-only here to treat writing the ONNX as success)")


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


def engine_sidecar(onnx_path: Path, tensorrt_version: str, gpu: str, options: EngineOptions,
                   strongly_typed: bool, layer_precisions: dict | None = None) -> dict:
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
        LAYER_PRECISIONS_KEY: layer_precisions or None,  # what the build applied
    }


def network_typing(onnx_metadata: dict, tensorrt_version: str) -> tuple[bool, dict, list[str]]:
    """(strongly typed?, layer precisions to apply, notes) for building an engine from an ONNX
    with ``onnx_metadata``: strongly typed (the ONNX's types decide) unless the ONNX carries a
    layer-precision list and this TensorRT still builds weakly typed networks."""
    precisions = recorded_layer_precisions(onnx_metadata)
    if not precisions:
        return True, {}, []
    fp16 = sum(p == FLOAT_LAYER_PRECISION for p in precisions.values())
    if builds_weakly_typed(tensorrt_version):
        return False, precisions, [
            f"weakly typed build with the ONNX's layer-precision list: {fp16} float-layer "
            f"node(s) preferred in FP16, {len(precisions) - fp16} in FP32, the rest as the Q/DQ "
            f"and the builder choose"]
    return True, {}, [
        f"TensorRT {tensorrt_version} builds strongly typed networks only: the {fp16} "
        f"float-layer node(s) of the precision config run in FP32, as the ONNX types them (the "
        f"layer-precision list applies to TensorRT 10.x)"]


def build_engine(onnx_path: str | Path, engine_path: str | Path,
                 options: EngineOptions | None = None) -> EngineResult:
    """Build and serialise an engine from a TensorRT-ready ONNX written by step 1."""
    reason = tensorrt_unavailable_reason()
    if reason:
        raise TensorRTUnavailable(reason)
    import tensorrt as trt

    options = options or EngineOptions()
    onnx_path, engine_path = Path(onnx_path), check_output_file(engine_path)
    start = time.time()
    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: the ONNX's types decide each layer's precision (Q/DQ for int8, FP16 tensors
    # for fp16). TensorRT 11 has no other mode; on 10.x it keeps LayerNorm/Softmax in FP32.
    # The exception: a layer-precision list (a precision config's float layers in FP16) needs a
    # weakly typed network, which TensorRT 10.x still builds.
    strongly_typed, precisions, notes = network_typing(read_onnx_metadata(onnx_path),
                                                       trt.__version__)
    network = builder.create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    if precisions:
        apply_layer_precisions(trt, network, config, precisions)
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
    with heartbeat(f"TensorRT engine build of {Path(onnx_path).name}"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (run with "
                           f"--verbose for the builder log)")
    sidecar = engine_sidecar(onnx_path, trt.__version__, cuda_gpu_name(), options,
                             strongly_typed=strongly_typed, layer_precisions=precisions)
    atomic_write(engine_path, lambda path: Path(path).write_bytes(bytes(serialized)))
    atomic_write(sidecar_path(engine_path),
                 lambda path: Path(path).write_text(json.dumps(sidecar, indent=2)))
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


