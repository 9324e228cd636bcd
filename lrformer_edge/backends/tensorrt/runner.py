"""TensorRT runner: deserialises an engine built by ``backends.tensorrt.engine.build_engine``.

TensorRT and cuda-python come with ``pip install 'lrformer-edge[tensorrt-runtime]'``. Device
memory and the CUDA stream come from cuda-python (NVIDIA's own binding, present on JetPack) or,
when that is missing, from a CUDA build of PyTorch, so a Jetson without PyTorch can run and gate
engines. ``settings`` reports the TensorRT version, GPU, the engine's precision and the memory
backend; the per-call time covers host-to-device copy, execution and device-to-host copy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.optional import require
from lrformer_edge.artifacts.runner import Runner, TensorSpec
from lrformer_edge.backends.tensorrt.cuda import RUNTIME_EXTRA, cuda_device

_TRT_TO_NUMPY = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64",
                 "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, path: str | Path, device: int = 0, name: str | None = None):
        super().__init__(name or f"tensorrt:{Path(path).name}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"engine {self.path} does not exist")
        self.device_index = device
        self._engine = self._context = self._device = None
        self._buffers: dict = {}

    # -- description (from the sidecar, readable without a GPU)
    @property
    def sidecar(self) -> dict:
        from lrformer_edge.backends.tensorrt.sidecar import read_sidecar

        return read_sidecar(self.path)

    @property
    def metadata(self) -> dict:
        from lrformer_edge.artifacts.metadata import decode_metadata

        return decode_metadata(self.sidecar["metadata"])

    @property
    def input_specs(self) -> list[TensorSpec]:
        if self._engine is None:
            size = self.metadata.get("input_size", [None, None])
            return [TensorSpec("input", "float32", (1, 3, *size))]
        return [self._spec(name) for name in self._tensor_names(input_tensors=True)]

    @property
    def output_names(self) -> list[str]:
        if self._engine is None:
            return ["logits"]
        return self._tensor_names(input_tensors=False)

    @property
    def settings(self) -> dict:
        sidecar = self.sidecar
        return {"tensorrt": sidecar.get("tensorrt_version"), "gpu": sidecar.get("gpu"),
                "precision": sidecar.get("precision"), "dla_core": sidecar.get("dla_core"),
                "strongly_typed": sidecar.get("strongly_typed"),
                "cuda_memory": self._device.kind if self._device else None}

    # -- lifecycle
    def _activate(self) -> None:
        trt = require("tensorrt", RUNTIME_EXTRA,
                      "the TensorRT runner (on a Jetson: JetPack's TensorRT)")
        self._device = cuda_device(self.device_index)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"TensorRT {trt.__version__} could not deserialise {self.path}; "
                               f"engines only run on the TensorRT version and GPU model that "
                               f"built them (see {self.path.name}.json)")
        self._context = self._engine.create_execution_context()
        for name in self._tensor_names(True) + self._tensor_names(False):
            spec = self._spec(name)
            host = np.empty(spec.shape, dtype=spec.dtype)
            self._buffers[name] = (host, self._device.allocate(host.nbytes))
            self._context.set_tensor_address(name, self._buffers[name][1])

    def _deactivate(self) -> None:
        for _, pointer in self._buffers.values():
            self._device.free(pointer)
        self._buffers.clear()
        self._device.close()
        self._context = self._engine = self._device = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        device = self._device
        for name, value in feed.items():
            host, pointer = self._buffers[name]
            np.copyto(host, value)
            device.to_device(pointer, host)
        if not self._context.execute_async_v3(device.stream_handle):
            raise RuntimeError(f"TensorRT execution of {self.path.name} failed")
        outputs = {}
        for name in self.output_names:
            host, pointer = self._buffers[name]
            device.to_host(host, pointer)
            outputs[name] = host
        device.synchronize()
        return {name: host.astype(np.float32) for name, host in outputs.items()}

    # -- engine introspection (TensorRT 10/11 named-tensor API)
    def _tensor_names(self, input_tensors: bool) -> list[str]:
        import tensorrt as trt

        wanted = trt.TensorIOMode.INPUT if input_tensors else trt.TensorIOMode.OUTPUT
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        return [n for n in names if self._engine.get_tensor_mode(n) == wanted]

    def _spec(self, name: str) -> TensorSpec:
        dtype = self._engine.get_tensor_dtype(name).name
        shape = tuple(int(d) if d >= 0 else None for d in self._engine.get_tensor_shape(name))
        return TensorSpec(name, _TRT_TO_NUMPY.get(dtype, dtype.lower()), shape)


