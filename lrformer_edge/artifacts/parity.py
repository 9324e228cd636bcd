"""Parity of an artifact with the PyTorch ground truth: thresholds per precision, the check, and
the deterministic inputs it runs on."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrformer_edge.artifacts.result import ArtifactCheckError
from lrformer_edge.metrics import Agreement, compare_logits
from lrformer_edge.progress import heartbeat

INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ParityError(ArtifactCheckError):
    """An exported artifact disagrees with the PyTorch ground truth beyond the tolerance."""


@dataclass
class ParityThresholds:
    max_abs: float = 1e-3
    min_cosine: float = 0.99999
    min_pixel_agreement: float = 0.9999

    def violations(self, agreement: Agreement) -> list[str]:
        found = agreement.nonfinite_problems()
        if agreement.max_abs is not None and agreement.max_abs > self.max_abs:
            found.append(f"max-abs {agreement.max_abs:.3g} > {self.max_abs:.3g}")
        if agreement.cosine is not None and agreement.cosine < self.min_cosine:
            found.append(f"cosine {agreement.cosine:.6f} < {self.min_cosine}")
        if agreement.pixel_agreement < self.min_pixel_agreement:
            found.append(f"argmax agreement {100 * agreement.pixel_agreement:.4f}% < "
                         f"{100 * self.min_pixel_agreement:.4f}%")
        return found


# FP16 weights cannot meet FP32's max-abs bound; what matters is the decision per pixel.
FP16_PARITY = ParityThresholds(max_abs=float("inf"), min_cosine=0.9999, min_pixel_agreement=0.995)


# INT8 is a sanity check on one real calibration image; accuracy is measured by validation.
# Measured: a correct INT8 model reaches cosine 0.9991-0.9998 (bundled LRFormer-T; the untrained
# tiny model too, whose near-tie logits flip 2-7% of its labels), while saturated int8 sums (a
# full-range OpenVINO IR on a CPU without VNNI) give cosine 0.95-0.978 and 42-69% agreement.
INT8_PARITY = ParityThresholds(max_abs=float("inf"), min_cosine=0.995, min_pixel_agreement=0.90)

# A QAT export is compared with the torch fake-quant model it came from, not with FP32: the same
# int8 model in another runtime, where only rounding at quantizer boundaries differs (measured:
# logits cosine 0.9986-0.9996, argmax agreement 99.7-99.8% for a Q/DQ ONNX in ONNX Runtime).
# A broken export (wrong scale, missing quantizer) lands far below these bounds.
QAT_EXPORT_PARITY = ParityThresholds(max_abs=float("inf"), min_cosine=0.995,
                                     min_pixel_agreement=0.99)


def parity_thresholds(precision: str) -> ParityThresholds:
    """The export parity bounds of an artifact of ``precision`` (fp32, fp16, int8)."""
    return {"fp16": FP16_PARITY, "int8": INT8_PARITY}.get(precision, ParityThresholds())


def parity_inputs(input_size, batch: int = 1, seed: int = 0) -> np.ndarray:
    """Normalised-pixel-like inputs for parity checks (deterministic)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *input_size, generator=generator).numpy()


def check_parity(model, runner, feed: np.ndarray, thresholds: ParityThresholds | None,
                 name: str) -> Agreement:
    """Compare ``runner`` (not yet active) with the PyTorch ``model`` on ``feed``; raise
    ``ParityError`` naming ``name`` when a threshold is crossed."""
    import torch

    from lrformer_edge.artifacts.runner import RunnerStateError

    with heartbeat(f"parity check of {name}"):
        with torch.no_grad():
            reference = model(torch.from_numpy(feed)).numpy()
        try:
            with runner:
                candidate = runner.infer({INPUT_NAME: feed})[OUTPUT_NAME]
        except RunnerStateError as error:  # the artifact does not load or compile
            raise ArtifactCheckError(f"{name} cannot be run: {error}") from None
    agreement = compare_logits(reference, candidate)
    if thresholds is not None:
        problems = thresholds.violations(agreement)
        if problems:
            raise ParityError(f"{name} disagrees with the PyTorch model: " + "; ".join(problems))
    return agreement


