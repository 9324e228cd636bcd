"""ONNX Runtime runner: CPU execution provider, CUDA / TensorRT providers when installed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.optional import require
from lrformer_edge.artifacts.runner import Runner, TensorSpec, cpu_settings

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(int64)": "int64", "tensor(uint8)": "uint8", "tensor(int32)": "int32"}
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                       "CPUExecutionProvider")


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | None = None,
                 threads: int | None = None, name: str | None = None):
        super().__init__(name or f"onnxruntime:{Path(path).name}")
        self.path = Path(path)
        self.requested_providers = providers
        self.threads = threads
        self.session = None

    def _activate(self) -> None:
        ort = require("onnxruntime", "dev", "the ONNX Runtime runner")
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        available = ort.get_available_providers()
        providers = self.requested_providers or [p for p in PREFERRED_PROVIDERS if p in available]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise ValueError(f"execution providers {unknown} are not available in this "
                             f"onnxruntime build; available: {available}")
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)

    def _deactivate(self) -> None:
        self.session = None

    def _session(self):
        if self.session is None:
            # Specs are readable before activation: open a throw-away CPU session.
            ort = require("onnxruntime", "dev", "the ONNX Runtime runner")
            return ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        return self.session

    @property
    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec(i.name, _ORT_TYPES.get(i.type, i.type),
                           tuple(d if isinstance(d, int) else None for d in i.shape))
                for i in self._session().get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._session().get_outputs()]

    @property
    def metadata(self) -> dict:
        """The lrformer-edge metadata embedded at export (variant, classes, mean/std...)."""
        from lrformer_edge.backends.onnxruntime.format import read_onnx_metadata

        return read_onnx_metadata(self.path)

    @property
    def settings(self) -> dict:
        import onnxruntime

        providers = self.session.get_providers() if self.session else self.requested_providers
        return {"providers": providers, "threads": self.threads or "default",
                "onnxruntime": onnxruntime.__version__, **cpu_settings()}

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, feed)
        return dict(zip(self.output_names, outputs))
