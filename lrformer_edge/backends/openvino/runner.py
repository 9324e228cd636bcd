"""OpenVINO runner with the inference precision always explicit.

OpenVINO's CPU plugin silently runs in bfloat16 on AMX CPUs unless told otherwise; this runner
always sets ``INFERENCE_PRECISION_HINT`` and reports what the compiled model actually uses, with
the CPU's ISA. An INT8 IR records the CPU ISA it was made for (``lrformer_edge.cpu``): one that
needs VNNI warns on a CPU without it, where its int8 sums saturate.

``emulate_exact_int8=True`` runs the IR's quantize/dequantize steps in float instead of int8
kernels (OpenVINO's low-precision transformations off): the arithmetic of a CPU that accumulates
int8 in 32 bits (VNNI, AMX), on any CPU. It is slow; it is for checks, not for deployment.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.optional import require
from lrformer_edge.artifacts.runner import (
    Runner,
    RunnerStateError,
    TensorSpec,
    cpu_settings,
)
from lrformer_edge.backends.openvino.ir import check_ir_header, read_rt_metadata
from lrformer_edge.cpu import int8_mismatch

PRECISIONS = ("f32", "bf16", "f16")
DEFAULT_PRECISION = "f32"  # explicit: the CPU plugin would pick bf16 on AMX CPUs
MODES = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
_WARNED: set[Path] = set()  # IRs whose CPU mismatch was already said


@dataclass(frozen=True)
class LayerTime:
    """One executed node: the IR's name, its type, the kernel that ran it (e.g. brgconv_avx512_1x1_I8,
    reorder_f32), and its time in milliseconds."""

    node: str
    node_type: str
    kernel: str
    ms: float


def _openvino():
    return require("openvino", "openvino", "the OpenVINO runner")


_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}


def native_precisions() -> tuple[str, ...]:
    """The inference precisions this CPU runs natively, as OpenVINO's CPU plugin reports them
    (``OPTIMIZATION_CAPABILITIES``); a hint for another one runs in f32."""
    capabilities = set(_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return tuple(hint for hint in PRECISIONS if hint == "f32" or _CAPABILITY[hint] in capabilities)


class OpenVINORunner(Runner):
    backend = "openvino"

    def __init__(self, path: str | Path, precision: str = DEFAULT_PRECISION, threads: int | None = None,
                 streams: int | None = None, mode: str = "latency", device: str = "CPU",
                 name: str | None = None, profile: bool = False,
                 emulate_exact_int8: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
        path = Path(path)
        if path.is_dir():
            candidates = sorted(path.glob("*.xml"))
            if len(candidates) != 1:
                raise ValueError(f"{path} should hold exactly one OpenVINO .xml, found "
                                 f"{[c.name for c in candidates]}")
            path = candidates[0]
        if path.suffix != ".xml" or not path.is_file():
            raise ValueError(f"expected an OpenVINO IR (.xml with its .bin beside it, or the folder "
                             f"holding one), got {path}" + ("" if path.exists() else
                                                            " (it does not exist)"))
        super().__init__(name or f"openvino:{path.name}:{precision}")
        self.path = path
        self.precision, self.threads, self.streams = precision, threads, streams
        self.mode, self.device, self.profile = mode, device, profile
        self.emulate_exact_int8 = emulate_exact_int8
        self.isa_warning: str | None = None
        self._model = None
        self.compiled = None
        self.request = None

    def _read(self):
        if self._model is None:
            check_ir_header(self.path)
            try:
                self._model = _openvino().Core().read_model(str(self.path))
            except RuntimeError as error:  # a damaged file: bad input, not a crash
                reason = [line for line in str(error).splitlines()
                          if line.strip() and not line.startswith("Exception from")][-1:]
                raise ValueError(f"cannot read the OpenVINO IR {self.path}: "
                                 f"{reason[0] if reason else error}") from None
        return self._model

    def _activate(self) -> None:
        ov = _openvino()
        config = {"INFERENCE_PRECISION_HINT": self.precision,
                  "PERFORMANCE_HINT": MODES[self.mode]}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        if self.streams:
            config["NUM_STREAMS"] = self.streams
        if self.profile:
            config["PERF_COUNT"] = "YES"
        if self.emulate_exact_int8:
            config["LP_TRANSFORMS_MODE"] = False  # FakeQuantize in float: no int8 kernels
        self._warn_on_isa_mismatch()
        try:
            self.compiled = ov.Core().compile_model(self._read(), self.device, config)
        except RuntimeError as error:
            # OpenVINO's message is a stack of "Exception from <file>" lines; the check that
            # failed is the last non-empty one.
            failed = [line for line in str(error).splitlines() if line.strip()][-1:]
            raise RunnerStateError(
                f"OpenVINO cannot compile {self.path.name} for {self.device} with {config}: "
                f"{failed[0] if failed else error}") from None
        self.request = self.compiled.create_infer_request()

    def _deactivate(self) -> None:
        self.request = self.compiled = None

    def int8_target(self) -> tuple[bool, str | None]:
        """(is an INT8 IR, the CPU ISA it was made for, or None if it records none)."""
        metadata = self.metadata
        quantization = metadata.get("quantization") or {}
        return (metadata.get("weights_precision") == "int8",
                quantization.get("target_cpu_isa") if isinstance(quantization, dict) else None)

    def _warn_on_isa_mismatch(self) -> None:
        is_int8, target = self.int8_target()
        if not is_int8 or self.emulate_exact_int8 or self.device != "CPU":
            return
        self.isa_warning = int8_mismatch(target)
        if self.isa_warning and self.path.resolve() not in _WARNED:
            _WARNED.add(self.path.resolve())  # once per IR and process, not per activation
            warnings.warn(f"{self.path.name}: {self.isa_warning}", RuntimeWarning, stacklevel=3)

    @property
    def input_specs(self) -> list[TensorSpec]:
        specs = []
        for port in self._read().inputs:
            dims = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
            specs.append(TensorSpec(port.get_any_name(), "float32", dims))
        return specs

    @property
    def output_names(self) -> list[str]:
        return [port.get_any_name() for port in self._read().outputs]

    @property
    def settings(self) -> dict:
        ov = _openvino()
        settings = {"device": self.device, "requested_precision": self.precision,
                    "mode": self.mode, "openvino": ov.__version__, **cpu_settings()}
        is_int8, target = self.int8_target()
        if is_int8:
            settings["int8_target_cpu_isa"] = target or "unrecorded"
            settings["int8_arithmetic"] = "emulated exact" if self.emulate_exact_int8 else "native"
        if self.isa_warning:
            settings["int8_warning"] = self.isa_warning
        if self.compiled is not None:
            used = self.compiled.get_property("INFERENCE_PRECISION_HINT")
            settings["inference_precision"] = getattr(used, "get_type_name", lambda: str(used))()
            settings["threads"] = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
            settings["streams"] = int(self.compiled.get_property("NUM_STREAMS"))
        return settings

    @property
    def metadata(self) -> dict:
        return read_rt_metadata(self._read())

    def throughput(self, feed: dict[str, np.ndarray], requests: int = 64) -> float:
        """Frames per second with all of the compiled model's parallel infer requests busy
        (asynchronous; meaningful with ``mode="throughput"``)."""
        import time

        if not self.active:
            raise RuntimeError("activate the runner first (with runner: ...)")
        feed = self.check_feed(feed)
        batch = next(iter(feed.values())).shape[0]
        queue = _openvino().AsyncInferQueue(
            self.compiled, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        for _ in range(len(queue)):  # warm every request once
            queue.start_async(feed)
        queue.wait_all()
        start = time.perf_counter()
        for _ in range(requests):
            queue.start_async(feed)
        queue.wait_all()
        return requests * batch / (time.perf_counter() - start)

    def layer_times(self) -> list[LayerTime]:
        """Per-node times of the last inference (OpenVINO's PERF_COUNT; ``profile=True``)."""
        if not self.profile:
            raise RunnerStateError("per-layer times need OpenVINORunner(..., profile=True)")
        if not self.active:
            raise RunnerStateError("activate the runner and run it first (with runner: ...)")
        return [LayerTime(info.node_name, info.node_type, info.exec_type,
                          info.real_time.total_seconds() * 1e3)
                for info in self.request.profiling_info]

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer(feed)
        return {port.get_any_name(): np.asarray(value) for port, value in results.items()}


