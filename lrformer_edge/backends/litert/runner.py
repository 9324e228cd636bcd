"""LiteRT runner: a ``.tflite`` in LiteRT's interpreter (``ai_edge_litert.interpreter``), on this
CPU through the XNNPACK delegate LiteRT applies by default (the CPU path of Android phones and
ARM boards runs the same delegate).

Threads: each interpreter has its own pool; ``threads=None`` uses LiteRT's default, and
``settings`` reports the count asked for.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.parity import INPUT_NAME, OUTPUT_NAME
from lrformer_edge.artifacts.runner import Runner, TensorSpec, check_thread_count, cpu_settings
from lrformer_edge.backends.litert.format import (
    EXPORT_HINT,
    TFLITE_SUFFIX,
    damaged,
    litert_module,
    metadata_of,
    read_tflite,
)


def open_interpreter(model: bytes, threads: int | None, name: str):
    """LiteRT's interpreter over ``model``, tensors allocated; a model LiteRT cannot read is a
    ValueError naming the file."""
    module = litert_module("ai_edge_litert.interpreter", "the LiteRT runner")
    try:
        interpreter = module.Interpreter(model_content=model, num_threads=threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as error:  # LiteRT's message for an unreadable model
        raise ValueError(f"LiteRT cannot load {name} ({str(error).splitlines()[0]}): the file "
                         f"is damaged, or needs operators this runtime lacks; {EXPORT_HINT}"
                         ) from None
    return interpreter


class LiteRTRunner(Runner):
    backend = "litert"

    def __init__(self, path: str | Path, threads: int | None = None, name: str | None = None):
        check_thread_count(threads, "LiteRT")
        path = Path(path)
        if path.suffix != TFLITE_SUFFIX:
            raise ValueError(f"expected a LiteRT model (.tflite file), got {path}")
        super().__init__(name or f"litert:{path.name}")
        self.path, self.threads = path, threads
        model = read_tflite(path)  # a foreign file fails here, with its reason
        self._metadata = metadata_of(model, path)
        try:
            self._input = _model_input(model, path)
        except (IndexError, struct.error) as error:  # a truncated file past its metadata
            raise damaged(path.name, error) from None
        self._interpreter = None

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

        return {"threads": self.threads or "default", "delegate": "XNNPACK (LiteRT's default)",
                "ai_edge_litert": importlib.metadata.version("ai-edge-litert"),
                "precision": self._metadata.get("precision"),
                "float_ops": self._metadata.get("float_ops", {}), **cpu_settings()}

    def _activate(self) -> None:
        self._interpreter = open_interpreter(read_tflite(self.path), self.threads,
                                             self.path.name)

    def _deactivate(self) -> None:
        self._interpreter = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interpreter = self._interpreter
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], feed[INPUT_NAME])
        interpreter.invoke()
        output = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        return {OUTPUT_NAME: np.array(output)}  # a copy: the interpreter reuses its buffer


def _model_input(model: bytes, path: Path) -> TensorSpec:
    """The one input of the model's main graph (an LRFormer Edge export has one input and one
    output, of fixed shape), read from the flatbuffer without building an interpreter."""
    schema = litert_module("ai_edge_litert.schema_py_generated", "reading a .tflite")
    root = schema.Model.GetRootAs(model, 0)
    graph = root.Subgraphs(0) if root.SubgraphsLength() else None
    if graph is None or graph.InputsLength() != 1 or graph.OutputsLength() != 1:
        raise ValueError(f"{path.name} has no graph with one input and one output, as "
                         f"LRFormer Edge exports have; {EXPORT_HINT}")
    tensor = graph.Tensors(graph.Inputs(0))
    dtype = _TENSOR_TYPES.get(tensor.Type(), f"tflite tensor type {tensor.Type()}")
    return TensorSpec(INPUT_NAME, dtype, tuple(int(size) for size in tensor.ShapeAsNumpy()))


# TFLite's TensorType codes of the dtypes an input may have here.
_TENSOR_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 9: "int8"}
