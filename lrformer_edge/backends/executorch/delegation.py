"""Which share of a ``.pte``'s latency runs inside XNNPACK, measured with ExecuTorch's own
profiler (ETDump events read by the devtools ``Inspector``).

The program's time is ``Method::execute``; the XNNPACK part is the sum of its ``DELEGATE_CALL``
events; every other operator event is a portable (non-delegated) kernel, reported by name. Op
counts come from the lowering (``lowering.count_ops``) and travel in the metadata.
"""
from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

_EXECUTE = "Method::execute"
_DELEGATE = "DELEGATE_CALL"
# OPERATOR_CALL wraps each portable kernel's own event: counting it too would count twice.
_FRAMEWORK_EVENTS = {_EXECUTE, "Method::init", "Program::load_method", "OPERATOR_CALL"}


@dataclass
class DelegationReport:
    # All from one run, the one with the median program time: per-event medians taken
    # separately can add up to more than the program's median.
    method_ms: float  # the whole program
    delegate_ms: float  # sum of the XNNPACK delegate calls
    portable_ms: dict[str, float] = field(default_factory=dict)  # op -> summed ms
    delegated_ops: Mapping[str, int] = field(default_factory=dict)
    portable_ops: Mapping[str, int] = field(default_factory=dict)
    runs: int = 0

    @property
    def xnnpack_share(self) -> float:
        return self.delegate_ms / self.method_ms if self.method_ms else 0.0

    @classmethod
    def from_dict(cls, recorded: Mapping) -> DelegationReport:
        """The report ``as_dict`` wrote (into the metadata)."""
        return cls(**{key: recorded[key] for key in cls.__dataclass_fields__ if key in recorded})

    def as_dict(self) -> dict:
        return {**asdict(self), "xnnpack_share": round(self.xnnpack_share, 4)}

    def summary(self) -> str:
        inside, outside = sum(self.delegated_ops.values()), sum(self.portable_ops.values())
        line = (f"XNNPACK runs {inside} of {inside + outside} operators and "
                f"{100 * self.xnnpack_share:.1f}% of the latency ({self.delegate_ms:.1f} of "
                f"{self.method_ms:.1f} ms, the median of {self.runs} runs)")
        if self.portable_ms:
            slowest = sorted(self.portable_ms.items(), key=lambda item: -item[1])[:5]
            line += "; outside: " + ", ".join(
                f"{name} x{self.portable_ops.get(name, '?')} {ms:.2f} ms "
                f"({100 * ms / self.method_ms:.1f}%)" for name, ms in slowest)
        return line


def measure_delegation(program: bytes, feed: np.ndarray, runs: int = 3,
                       delegated_ops: Mapping[str, int] | None = None,
                       portable_ops: Mapping[str, int] | None = None) -> DelegationReport:
    """Run ``program`` (``.pte`` bytes) ``runs`` times on ``feed`` with ETDump profiling."""
    import torch
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    loaded = Runtime.get().load_program(program, enable_etdump=True, debug_buffer_size=0)
    method = loaded.load_method("forward")
    inputs = [torch.from_numpy(np.ascontiguousarray(feed))]
    for _ in range(runs):
        method.execute(inputs)
    with tempfile.TemporaryDirectory() as scratch:
        etdump = Path(scratch) / "profile.etdp"
        loaded.write_etdump_result_to_file(str(etdump), str(Path(scratch) / "debug.bin"))
        with warnings.catch_warnings():  # no debug buffer: we want timings, not tensors
            warnings.simplefilter("ignore", UserWarning)
            inspector = Inspector(etdump_path=str(etdump))
    report = _from_events(inspector, list(portable_ops or {}))
    report.delegated_ops, report.portable_ops = dict(delegated_ops or {}), dict(portable_ops or {})
    report.runs = runs
    return report


def _from_events(inspector, op_names: list[str]) -> DelegationReport:
    events = [event for block in inspector.event_blocks for event in block.events
              if event.perf_data and not event.is_delegated_op]  # delegated ops: inside a call
    run = _median_run([event for event in events if event.name == _EXECUTE])
    method_ms = delegate_ms = 0.0
    portable: dict[str, float] = {}
    for event in events:
        ms = _time_in_run(event, run)
        if event.name == _EXECUTE:
            method_ms += ms
        elif event.name == _DELEGATE:
            delegate_ms += ms
        elif event.name not in _FRAMEWORK_EVENTS:
            name = _portable_op_name(event.name, op_names)
            portable[name] = portable.get(name, 0.0) + ms
    return DelegationReport(method_ms, delegate_ms, portable)


def _median_run(executes: list) -> int | None:
    """Index of the run whose whole-program time is the median (the lower one for even runs)."""
    if len(executes) != 1:
        return None
    times = list(executes[0].perf_data.raw)
    return sorted(range(len(times)), key=times.__getitem__)[(len(times) - 1) // 2]


def _time_in_run(event, run: int | None) -> float:
    raw = event.perf_data.raw
    if run is not None and run < len(raw):
        return float(raw[run])
    return float(np.median(raw))  # an event not seen once per run: its median is the best guess


def _portable_op_name(event_name: str, op_names: list[str]) -> str:
    """``native_call_convolution.out`` -> ``aten.convolution``: the name the lowering counted
    the op under (``op_names``), else ``aten.<op>``."""
    base = event_name.removeprefix("native_call_").split(".")[0]
    for name in op_names:
        if name.rsplit(".", 1)[-1] == base:
            return name
    return f"aten.{base}"
