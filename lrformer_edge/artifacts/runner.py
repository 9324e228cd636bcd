"""One runner interface over every backend (Polygraphy style).

    with runner:
        outputs = runner.infer({"input": batch})

Inputs are checked before the backend sees them: names, dtypes and shapes, with messages that say
what was received and what was expected. Every call is timed (``runner.timings``).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


class RunnerInputError(ValueError):
    """A feed that does not match the runner's inputs."""


class RunnerStateError(RuntimeError):
    """A runner used outside ``with runner:`` (or activated twice)."""


def check_thread_count(threads, runtime: str) -> None:
    """``threads`` of a runner whose runtime picks its own count when given None."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None ({runtime}'s default), "
                         f"got {threads!r}")


def cpu_settings() -> dict:
    """The CPU facts every CPU runner reports beside its own settings (timings depend on them)."""
    from lrformer_edge.cpu import host_cpu

    cpu = host_cpu()
    return {"cpu": cpu.describe(), "cpu_isa": cpu.isa}


def unhonoured_hint(settings: dict) -> str | None:
    """'the bf16 hint ran in f32 on this CPU' when a runner computes in another precision than
    it was asked for (OpenVINO without native bf16), else None."""
    asked, used = settings.get("requested_precision"), settings.get("inference_precision")
    return f"the {asked} hint ran in {used} on this CPU" if asked and used and asked != used else None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | None, ...]  # None: any size along that axis

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


class Runner(ABC):
    """Backend-independent inference: activation, input checks and timing."""

    backend = "base"

    def __init__(self, name: str):
        self.name = name
        self.active = False
        self.timings: list[float] = []

    # -- lifecycle
    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if self.active:
            raise RunnerStateError(f"runner {self.name} is already active")
        self._activate()
        self.active = True

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    # -- description
    @property
    @abstractmethod
    def input_specs(self) -> list[TensorSpec]:
        ...

    @property
    @abstractmethod
    def output_names(self) -> list[str]:
        ...

    @property
    def settings(self) -> dict:
        """Backend settings that affect numerics or speed (precision, threads, device...)."""
        return {}

    # -- inference
    def infer(self, feed: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        if not self.active:
            raise RunnerStateError(
                f"runner {self.name} is not active; use it as `with runner: runner.infer(feed)`")
        feed = self.check_feed(feed)
        start = time.perf_counter()
        outputs = self._infer(feed)
        self.timings.append(time.perf_counter() - start)
        return outputs

    @property
    def last_inference_time(self) -> float | None:
        return self.timings[-1] if self.timings else None

    def check_feed(self, feed) -> dict[str, np.ndarray]:
        specs = self.input_specs
        if isinstance(feed, np.ndarray):
            if len(specs) != 1:
                raise RunnerInputError(f"{self.name} has {len(specs)} inputs; pass a dict")
            feed = {specs[0].name: feed}
        if not isinstance(feed, Mapping):
            raise RunnerInputError(
                f"expected a dict of numpy arrays ({', '.join(s.describe() for s in specs)}), "
                f"got {type(feed).__name__}")
        expected_names = [s.name for s in specs]
        missing = [n for n in expected_names if n not in feed]
        extra = [n for n in feed if n not in expected_names]
        if missing or extra:
            raise RunnerInputError(
                f"{self.name}: feed has inputs {sorted(feed)}, expected {expected_names}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unexpected {extra})" if extra else ""))
        checked = {}
        for spec in specs:
            value = feed[spec.name]
            if not isinstance(value, np.ndarray):
                raise RunnerInputError(
                    f"input {spec.name!r} must be a numpy array ({spec.describe()}), "
                    f"got {type(value).__name__}")
            if value.dtype != np.dtype(spec.dtype):
                raise RunnerInputError(
                    f"input {spec.name!r} has dtype {value.dtype}, expected {spec.dtype} "
                    f"({spec.describe()})")
            if value.ndim != len(spec.shape) or any(
                    want is not None and got != want for got, want in zip(value.shape, spec.shape)):
                raise RunnerInputError(
                    f"input {spec.name!r} has shape {tuple(value.shape)}, expected "
                    f"{spec.describe()}")
            checked[spec.name] = np.ascontiguousarray(value)
        return checked

    # -- backend hooks
    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        pass

    @abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...
