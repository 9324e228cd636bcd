"""ExecuTorch runner: a ``.pte`` (XNNPACK delegate plus portable kernels) in ExecuTorch's Python
runtime (``executorch.runtime``), on this CPU.

Threads: ExecuTorch runs XNNPACK on one process-wide thread pool. ``threads=N`` resizes it
when the runner is activated and again before an inference that finds another size (another
runner may have changed it); ``threads=None`` uses the size ExecuTorch chose when this process
first used it. ``settings`` reports the size actually in use, never only the one asked for.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.parity import INPUT_NAME, OUTPUT_NAME
from lrformer_edge.artifacts.runner import Runner, TensorSpec, check_thread_count, cpu_settings
from lrformer_edge.backends.executorch.format import (
    EXPORT_HINT,
    FORWARD_METHOD,
    PTE_SUFFIX,
    delegation_summary,
    executorch_module,
    load_program,
    metadata_of,
)

# ExecuTorch's ScalarType codes of the dtypes a .pte input or output may have here.
_SCALAR_TYPES = {6: "float32", 5: "float16", 3: "int32", 4: "int64", 0: "uint8", 1: "int8"}


@functools.cache
def _threadpool():
    """ExecuTorch's thread pool functions (``_unsafe_reset_threadpool``: no inference may be
    running while it is resized; runners resize it only between inferences)."""
    return executorch_module("executorch.extension.pybindings.portable_lib",
                             "the ExecuTorch runner")


@functools.cache
def default_threads() -> int:
    """The thread pool size ExecuTorch chose for this process (read before any runner resizes
    it: the first call happens before the first resize)."""
    return int(_threadpool()._threadpool_get_thread_count())


def threads_in_use() -> int:
    return int(_threadpool()._threadpool_get_thread_count())


def use_threads(count: int) -> None:
    """Resize ExecuTorch's process-wide thread pool to ``count`` (no-op when it has that size)."""
    default_threads()  # remember the default before it is changed
    if threads_in_use() != count:
        _threadpool()._unsafe_reset_threadpool(count)


class ExecuTorchRunner(Runner):
    backend = "executorch"

    def __init__(self, path: str | Path, threads: int | None = None, name: str | None = None):
        check_thread_count(threads, "ExecuTorch")
        path = Path(path)
        if path.suffix != PTE_SUFFIX:
            raise ValueError(f"expected an ExecuTorch program (.pte file), got {path}")
        super().__init__(name or f"executorch:{path.name}")
        self.path, self.threads = path, threads
        program = load_program(path)  # a damaged or foreign file fails here, with its reason
        self._metadata = metadata_of(program, path)
        self._input = _forward_input(program, path)
        self._program = None
        self._method = None

    @property
    def metadata(self) -> dict:
        return dict(self._metadata)

    @property
    def input_specs(self) -> list[TensorSpec]:
        return [self._input]

    @property
    def output_names(self) -> list[str]:
        return [OUTPUT_NAME]

    @property
    def settings(self) -> dict:
        import importlib.metadata

        return {"threads": threads_in_use(), "requested_threads": self.threads or "default",
                "executorch": importlib.metadata.version("executorch"),
                "precision": self._metadata.get("precision"),
                "delegation": delegation_summary(self._metadata), **cpu_settings()}

    def _activate(self) -> None:
        use_threads(self.threads or default_threads())
        program = load_program(self.path)
        try:
            self._method = program.load_method(FORWARD_METHOD)
        except RuntimeError as error:  # ExecuTorch's error code: damaged data, or a delegate
            raise ValueError(f"ExecuTorch cannot load the {FORWARD_METHOD} method of "
                             f"{self.path.name} ({error}): the file is damaged, or needs a "
                             f"delegate this runtime lacks; {EXPORT_HINT}") from None
        self._program = program  # the method's memory belongs to its program

    def _deactivate(self) -> None:
        self._method = self._program = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        use_threads(self.threads or default_threads())
        outputs = self._method.execute([torch.from_numpy(feed[INPUT_NAME])])
        return {OUTPUT_NAME: outputs[0].numpy()}


def _forward_input(program, path: Path) -> TensorSpec:
    """The one input of the program's forward method (an LRFormer Edge export has one input
    and one output, of fixed shape)."""
    meta = program.metadata(FORWARD_METHOD) if FORWARD_METHOD in program.method_names else None
    if meta is None or meta.num_inputs() != 1 or meta.num_outputs() != 1:
        raise ValueError(f"{path.name} has no {FORWARD_METHOD} method with one input and one "
                         f"output, as LRFormer Edge exports have; {EXPORT_HINT}")
    info = meta.input_tensor_meta(0)
    code = int(info.dtype())
    return TensorSpec(INPUT_NAME, _SCALAR_TYPES.get(code, f"executorch scalar type {code}"),
                      tuple(int(size) for size in info.sizes()))
