"""Ground-truth outputs of the FP32 PyTorch model, computed once and reusable elsewhere.

A Jetson often has no PyTorch: compute the reference on a workstation
(``validate.py --save-reference ref.npz``), copy the file, and gate the device's artifacts with
``--load-reference ref.npz``. The file holds every sample's label map, the logits of the first
``logit_images`` samples (float32: float16 rounding alone would exceed the FP32 max-abs limits;
about 12 MiB each at 512x512 with 12 classes, for max-abs / cosine), the samples' names (checked on load, so
outputs are never compared with other images), the model's identity and its latency.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrformer_edge.files import atomic_write
from lrformer_edge.progress import track

FORMAT_VERSION = 1


@dataclass
class ReferenceOutputs:
    names: list[str]
    labels: dict[str, np.ndarray]
    logits: dict[str, np.ndarray]  # float32 (1, C, h, w) at input_size, for the first samples
    input_size: tuple[int, int]
    model: dict  # variant, checkpoint_sha256, num_classes, class_names
    latency_ms: list[float] = field(default_factory=list)

    def check_samples(self, names: list[str]) -> None:
        if list(names) != list(self.names):
            extra = sorted(set(names) - set(self.names))[:3]
            missing = sorted(set(self.names) - set(names))[:3]
            raise ValueError(
                f"the saved reference was computed on other images ({len(self.names)} samples; "
                f"here {len(names)}; e.g. not in the reference: {extra}, only in it: {missing}); "
                f"use the same --data/--images as for --save-reference")

    def save(self, path: str | Path) -> Path:
        header = {"format_version": FORMAT_VERSION, "names": self.names,
                  "input_size": list(self.input_size), "model": self.model,
                  "latency_ms": self.latency_ms, "logit_names": list(self.logits)}
        arrays = {f"labels/{i}": self.labels[n] for i, n in enumerate(self.names)}
        arrays.update({f"logits/{i}": self.logits[n].astype(np.float32)
                       for i, n in enumerate(self.names) if n in self.logits})
        buffer = io.BytesIO()
        np.savez_compressed(buffer, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
                            **arrays)
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceOutputs":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"reference outputs {path} do not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                if header.get("format_version") != FORMAT_VERSION:
                    raise ValueError(f"{path} has format {header.get('format_version')}, "
                                     f"expected {FORMAT_VERSION}")
                names = header["names"]
                labels = {n: data[f"labels/{i}"] for i, n in enumerate(names)}
                logits = {n: data[f"logits/{i}"] for i, n in enumerate(names)
                          if f"logits/{i}" in data.files}
        except (OSError, KeyError, json.JSONDecodeError, ValueError) as error:
            if isinstance(error, ValueError) and "format" in str(error):
                raise
            raise ValueError(f"{path} is not a reference-outputs file written by "
                             f"validate.py --save-reference ({error})") from None
        return cls(names, labels, logits, tuple(header["input_size"]), header["model"],
                   header.get("latency_ms", []))


def compute_reference(model, samples, input_size, logit_images: int = 5) -> ReferenceOutputs:
    """Run the FP32 PyTorch ``model`` through the common pipeline on ``samples``."""
    from lrformer_edge.pipeline import SegmentationPipeline

    names, labels, logits, latency = [], {}, {}, []
    with SegmentationPipeline.from_model(model, tuple(input_size)) as pipeline:
        for sample in track(samples, what="images", label="FP32 PyTorch ground truth"):
            prediction = pipeline.predict(sample.image)
            names.append(sample.name)
            labels[sample.name] = prediction.labels
            if len(logits) < logit_images:
                logits[sample.name] = prediction.logits.astype(np.float32)
            latency.append(1000 * prediction.inference_seconds)
    data = model.config.data
    identity = {"variant": model.config.name, "num_classes": data.num_classes,
                "class_names": list(data.class_names),
                "checkpoint_sha256": getattr(model, "checkpoint_sha256", None)
                or "none (untrained)"}
    return ReferenceOutputs(names, labels, logits, tuple(input_size), identity, latency)
