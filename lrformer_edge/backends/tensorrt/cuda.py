"""CUDA devices for the TensorRT runner and engine builder: cuda-python where installed, else
PyTorch's CUDA."""
from __future__ import annotations

import numpy as np

# The pyproject extra that installs what builds and runs engines (tensorrt + cuda-python); the
# "tensorrt" extra is NNCF only, for the Q/DQ ONNX that any machine can write.
RUNTIME_EXTRA = "tensorrt-runtime"
RUNTIME_INSTALL = (f"pip install 'lrformer-edge[{RUNTIME_EXTRA}]' (x86 with an NVIDIA GPU; on a "
                   f"Jetson: JetPack's TensorRT, seen from a venv made with "
                   f"--system-site-packages, and pip install cuda-python)")


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
    raise RuntimeError(f"the TensorRT runner needs an NVIDIA GPU and cuda-python or a CUDA "
                       f"build of PyTorch; neither is usable here. Install: {RUNTIME_INSTALL}")


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


