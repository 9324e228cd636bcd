"""TensorRT runner: deserialises an engine built by ``export.tensorrt.build_engine``.

Device memory and the CUDA stream come from cuda-python (``pip install cuda-python``; NVIDIA's
own binding, present on JetPack) or, when that is missing, from a CUDA build of PyTorch, so a
Jetson without PyTorch can run and gate engines. ``settings`` reports the TensorRT version, GPU,
the engine's precision and the memory backend; the per-call time covers host-to-device copy,
execution and device-to-host copy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lrformer_edge.runners.base import Runner, TensorSpec, require

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
        from lrformer_edge.export.tensorrt import read_sidecar

        return read_sidecar(self.path)

    @property
    def metadata(self) -> dict:
        from lrformer_edge.export.metadata import decode_metadata

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
        trt = require("tensorrt", "tensorrt", "the TensorRT runner (x86: pip install tensorrt; "
                                              "Jetson: the system TensorRT)")
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


class _CudaPythonDevice:
    kind = "cuda-python"

    def __init__(self, index: int, cudart):
        self.cudart = cudart
        self._check(cudart.cudaSetDevice(index))
        self.stream = self._check(cudart.cudaStreamCreate())

    def _check(self, result):
        error, *values = result if isinstance(result, tuple) else (result,)
        if int(error) != 0:
            raise RuntimeError(f"CUDA error {error} ({self.cudart.cudaGetErrorString(error)[1]})")
        return values[0] if len(values) == 1 else values

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def allocate(self, nbytes: int) -> int:
        return int(self._check(self.cudart.cudaMalloc(max(1, nbytes))))

    def free(self, pointer: int) -> None:
        self.cudart.cudaFree(pointer)

    def to_device(self, pointer: int, host: np.ndarray) -> None:
        self._check(self.cudart.cudaMemcpyAsync(
            pointer, host.ctypes.data, host.nbytes,
            self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def to_host(self, host: np.ndarray, pointer: int) -> None:
        self._check(self.cudart.cudaMemcpyAsync(
            host.ctypes.data, pointer, host.nbytes,
            self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def synchronize(self) -> None:
        self._check(self.cudart.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        self.cudart.cudaStreamDestroy(self.stream)


class _TorchDevice:
    kind = "torch.cuda"

    def __init__(self, index: int, torch):
        self.torch = torch
        torch.cuda.set_device(index)
        self.stream = torch.cuda.Stream()
        self._tensors: dict[int, object] = {}

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream

    def allocate(self, nbytes: int) -> int:
        tensor = self.torch.empty(max(1, nbytes), dtype=self.torch.uint8, device="cuda")
        self._tensors[tensor.data_ptr()] = tensor
        return tensor.data_ptr()

    def free(self, pointer: int) -> None:
        self._tensors.pop(pointer, None)

    def to_device(self, pointer: int, host: np.ndarray) -> None:
        source = self.torch.from_numpy(host.reshape(-1).view(np.uint8))
        with self.torch.cuda.stream(self.stream):
            self._tensors[pointer].copy_(source, non_blocking=False)

    def to_host(self, host: np.ndarray, pointer: int) -> None:
        with self.torch.cuda.stream(self.stream):
            data = self._tensors[pointer].cpu().numpy()
        host.reshape(-1).view(np.uint8)[:] = data

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self._tensors.clear()


def _cudart():
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            import importlib

            return importlib.import_module(module)
        except ImportError:
            continue
    return None


def cuda_device(index: int = 0):
    """Device memory + stream from cuda-python, else from a CUDA build of PyTorch."""
    cudart = _cudart()
    if cudart is not None:
        return _CudaPythonDevice(index, cudart)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        return _TorchDevice(index, torch)
    raise RuntimeError("the TensorRT runner needs an NVIDIA GPU and cuda-python "
                       "(pip install cuda-python) or a CUDA build of PyTorch; neither is usable "
                       "here")


def cuda_gpu_name(index: int = 0) -> str | None:
    """Name of the GPU, or None when no CUDA device is visible (via cuda-python or torch)."""
    cudart = _cudart()
    if cudart is not None:
        error, count = cudart.cudaGetDeviceCount()
        if int(error) != 0 or count <= index:
            return None
        error, properties = cudart.cudaGetDeviceProperties(index)
        name = properties.name
        return name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(index)
