"""The backend registry, and runners: one interface (``with runner: runner.infer(feed)``) over
every backend.

``BACKENDS`` lists every deployment target's ``Backend`` record (``backends/base.py``), the
PyTorch ground truth first; each comes from its folder here. ``load_runner(path)`` asks them
which one runs an artifact. Adding a backend is its folder, one line below, a thresholds row in
``validation/thresholds.yaml`` and its tests. SDKs are imported only when used, so this module
loads where they (and PyTorch) are missing.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lrformer_edge.artifacts.optional import MissingDependencyError
from lrformer_edge.artifacts.runner import (
    Runner,
    RunnerInputError,
    RunnerStateError,
    TensorSpec,
)
from lrformer_edge.backends import (
    coreml,
    executorch,
    litert,
    onnxruntime,
    openvino,
    pytorch,
    tensorrt,
)
from lrformer_edge.backends.base import Backend

BACKENDS: tuple[Backend, ...] = (
    pytorch.BACKEND,
    onnxruntime.BACKEND,
    openvino.BACKEND,
    tensorrt.BACKEND,
    coreml.BACKEND,
    executorch.BACKEND,
    litert.BACKEND,
)

GROUND_TRUTH = BACKENDS[0]  # the FP32 PyTorch model every artifact is measured against
ARTIFACT_SUFFIXES = tuple(suffix for backend in BACKENDS for suffix in backend.suffixes)


def get_backend(name: str) -> Backend:
    for backend in BACKENDS:
        if backend.name == name:
            return backend
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(b.name for b in BACKENDS)}")


def artifact_kinds() -> str:
    """Every kind of artifact a backend runs, for help texts and errors."""
    return "; ".join(backend.artifact_kind for backend in BACKENDS)


def backend_for(path: str | Path) -> Backend:
    """The backend that runs an artifact: by suffix, else by what it holds (an IR folder)."""
    path = Path(path)
    for backend in BACKENDS:
        if path.suffix in backend.suffixes:
            return backend
    for backend in BACKENDS:
        if backend.recognises and backend.recognises(path):
            return backend
    raise ValueError(f"cannot tell which backend runs {path}: expected one of "
                     f"{artifact_kinds()}")


def resolve_backend_options(given: Mapping[str, Mapping] | None = None) -> dict[str, dict]:
    """Every backend's runtime option values: ``given`` (backend name -> option -> value) over
    the defaults. An unknown backend, option or value is a ValueError naming what is known."""
    given = dict(given or {})
    for name in given:
        get_backend(name)
    return {backend.name: _option_values(backend, given.get(backend.name) or {})
            for backend in BACKENDS}


def _option_values(backend: Backend, given: Mapping) -> dict:
    options = {option.name: option for option in backend.runtime_options}
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise ValueError(f"unknown runtime option(s) {unknown} for backend {backend.name}; "
                         f"known: {sorted(options) or 'none'}")
    for name, value in given.items():
        if value not in options[name].choices:
            raise ValueError(f"{backend.name} option {name} must be one of "
                             f"{options[name].choices}, got {value!r}")
    return {**backend.option_defaults(), **given}


def load_runner(path: str | Path, variant: str | None = None, **options) -> Runner:
    """The runner for an artifact, chosen from its type and metadata.

    ``variant`` names the registry variant of a checkpoint that does not record it; naming one
    that differs from the variant the artifact records is a ValueError, never silently ignored.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact {path} does not exist")
    return backend_for(path).open_runner(path, variant=variant, **options)


__all__ = ["ARTIFACT_SUFFIXES", "BACKENDS", "GROUND_TRUTH", "Backend", "MissingDependencyError", "Runner",
           "RunnerInputError", "RunnerStateError", "TensorSpec", "artifact_kinds",
           "backend_for", "get_backend", "load_runner", "resolve_backend_options"]
