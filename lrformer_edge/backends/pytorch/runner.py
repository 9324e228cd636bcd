"""PyTorch runner: the full-precision ground truth (CPU, or CUDA when present)."""
from __future__ import annotations

import numpy as np
import torch

from lrformer_edge.artifacts.runner import Runner, TensorSpec, cpu_settings

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

    @property
    def input_specs(self) -> list[TensorSpec]:
        height, width = self.input_size or (None, None)
        return [TensorSpec(INPUT_NAME, "float32", (self.batch_size, 3, height, width))]

    @property
    def output_names(self) -> list[str]:
        return [OUTPUT_NAME]

    @property
    def metadata(self) -> dict:
        from lrformer_edge.artifacts.metadata import artifact_metadata, decode_metadata

        return decode_metadata(artifact_metadata(self.model, self.input_size or
                                                 self.model.config.data.native_size))

    @property
    def settings(self) -> dict:
        return {"device": str(self.device), "precision": "fp32",
                "threads": torch.get_num_threads(), "torch": torch.__version__,
                **(cpu_settings() if str(self.device) == "cpu" else {})}

    def _activate(self) -> None:
        if self.device.type == "cuda":
            # The reference tolerances assume true fp32 matmuls (no TF32).
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.model.to(self.device).eval()

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(feed[INPUT_NAME]).to(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {OUTPUT_NAME: logits.float().cpu().numpy()}
