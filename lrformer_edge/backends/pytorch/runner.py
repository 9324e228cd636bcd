"""PyTorch runner: the full-precision ground truth (CPU, or CUDA when present).

On CUDA the runner computes in true FP32 (no TF32), which the reference tolerances assume. The
TF32 switches are process-wide, so they are turned off while the runner is active and put back as
they were when it is deactivated.
"""
from __future__ import annotations

import numpy as np
import torch

from lrformer_edge.artifacts.metadata import artifact_metadata, decode_metadata
from lrformer_edge.artifacts.runner import Runner, TensorSpec, cpu_settings
from lrformer_edge.registry import input_size_of

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class TorchRunner(Runner):
    backend = "pytorch"

    def __init__(self, model: torch.nn.Module, input_size: tuple[int, int] | None = None,
                 device: str | None = None, batch_size: int | None = None,
                 name: str | None = None):
        super().__init__(name or f"pytorch:{getattr(getattr(model, 'config', None), 'name', 'model')}")
        self.model = model
        self.input_size = tuple(input_size) if input_size else None
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._saved_tf32: tuple[bool, bool] | None = None

    @property
    def input_specs(self) -> list[TensorSpec]:
        height, width = self.input_size or (None, None)
        return [TensorSpec(INPUT_NAME, "float32", (self.batch_size, 3, height, width))]

    @property
    def output_names(self) -> list[str]:
        return [OUTPUT_NAME]

    @property
    def metadata(self) -> dict:
        return decode_metadata(artifact_metadata(self.model,
                                                 input_size_of(self.model, self.input_size)))

    @property
    def settings(self) -> dict:
        return {"device": str(self.device), "precision": "fp32",
                "threads": torch.get_num_threads(), "torch": torch.__version__,
                **(cpu_settings() if str(self.device) == "cpu" else {})}

    def _activate(self) -> None:
        if self.device.type == "cuda":
            self._saved_tf32 = _tf32_flags()
            _set_tf32_flags(False, False)
        try:
            self.model.to(self.device).eval()
        except BaseException:  # not activated: deactivate() will not run, so restore here
            self._deactivate()
            raise

    def _deactivate(self) -> None:
        if self._saved_tf32 is not None:
            _set_tf32_flags(*self._saved_tf32)
            self._saved_tf32 = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(feed[INPUT_NAME]).to(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {OUTPUT_NAME: logits.float().cpu().numpy()}


def _tf32_flags() -> tuple[bool, bool]:
    """(matmul, cuDNN) TF32 switches of this process."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32_flags(matmul: bool, cudnn: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn
