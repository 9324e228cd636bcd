"""ONNX export of the deploy form, with embedded metadata and a parity check.

``export_onnx`` converts with ``to_deploy`` for the requested size, exports (TorchScript-based
exporter, opset 17 by default: LayerNormalization is native there and TensorRT 10.x parses
opsets 9-20), optionally simplifies, embeds metadata, verifies the file against the PyTorch
model with ONNX Runtime, and only then moves it into place.
"""
from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrformer_edge.export.metadata import artifact_metadata, decode_metadata
from lrformer_edge.metrics import Agreement, compare_logits
from lrformer_edge.files import atomic_write, check_output_file

MAX_OPSET = 20  # newest opset TensorRT 10.x parses
MIN_OPSET = 17  # LayerNormalization
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ArtifactCheckError(RuntimeError):
    """An artifact failed a check before it was written (so nothing was written)."""


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


def parity_thresholds(precision: str) -> ParityThresholds:
    """The export parity bounds of an artifact of ``precision`` (fp32, fp16, int8)."""
    return {"fp16": FP16_PARITY, "int8": INT8_PARITY}.get(precision, ParityThresholds())


@dataclass
class ExportResult:
    path: Path
    parity: Agreement | None
    seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def summary(self) -> str:
        from lrformer_edge.files import artifact_size_bytes

        size = artifact_size_bytes(self.path) / 2**20
        nodes = f"{sum(self.op_counts.values())} nodes, " if self.op_counts else ""
        lines = [f"wrote {self.path} ({size:.1f} MiB, {nodes}{self.seconds:.1f} s)"]
        if self.parity is not None:
            p = self.parity
            lines.append(f"parity vs PyTorch: max-abs {p.max_abs:.2e}, cosine {p.cosine:.7f}, "
                         f"argmax agreement {100 * p.pixel_agreement:.4f}%")
        return "\n".join(lines)


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

    from lrformer_edge.runners.base import RunnerStateError

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


def export_onnx(model, output: str | Path, input_size=None, batch_size: int | None = 1,
                opset: int = MIN_OPSET, simplify: bool = False,
                parity: ParityThresholds | None = ParityThresholds(),
                extra_metadata: dict | None = None) -> ExportResult:
    """Export ``model`` (reference or deploy form) to a single-file ONNX at ``output``.

    ``batch_size=None`` makes the batch dimension dynamic. ``parity=None`` skips the check
    (not recommended); otherwise a violation raises ``ParityError`` and nothing is written.
    """
    import onnx
    import torch

    from lrformer_edge.models.deploy import check_input_size, to_deploy

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must lie in [{MIN_OPSET}, {MAX_OPSET}] (TensorRT 10.x parses up "
                         f"to {MAX_OPSET}; LayerNormalization needs {MIN_OPSET}), got {opset}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive or None (dynamic), got {batch_size}")
    input_size = check_input_size(input_size or model.config.data.native_size)
    output = Path(output)
    if output.suffix != ".onnx":
        raise ValueError(f"output must end in .onnx, got {output}")
    check_output_file(output)
    start = time.time()
    deployed = to_deploy(model, input_size)
    example = torch.from_numpy(parity_inputs(input_size, batch_size or 1))
    with tempfile.TemporaryDirectory(prefix="lrformer-onnx-") as tmp:
        raw = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about constant sizes is expected
            torch.onnx.export(
                deployed, (example,), str(raw), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes=None if batch_size else {INPUT_NAME: {0: "batch"},
                                                      OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True)
        graph = onnx.load(str(raw))
        if simplify:
            graph = _simplify(graph)
        metadata = artifact_metadata(
            model, input_size, format="onnx", opset=opset,
            batch_size=batch_size or "dynamic", exporter=f"torch.onnx (TorchScript) {torch.__version__}",
            **(extra_metadata or {}))
        del graph.metadata_props[:]
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(graph, full_check=True)
        checked = Path(tmp) / "checked.onnx"
        onnx.save(graph, str(checked))
        agreement = None
        if parity is not None:
            from lrformer_edge.runners.onnxruntime import OnnxRuntimeRunner

            runner = OnnxRuntimeRunner(checked, providers=["CPUExecutionProvider"])
            agreement = check_parity(deployed, runner, example.numpy(), parity, output.name)
        atomic_write(output, lambda tmp_path: Path(tmp_path).write_bytes(checked.read_bytes()))
    return ExportResult(output, agreement, time.time() - start, op_histogram(graph),
                        decode_metadata(metadata))


def _simplify(graph):
    try:
        import onnxsim
    except ImportError:
        raise ImportError("--simplify needs onnxsim: pip install onnxsim") from None
    simplified, ok = onnxsim.simplify(graph)
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model")
    return simplified


def op_histogram(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def read_onnx_metadata(path: str | Path) -> dict:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except DecodeError as error:  # truncated, damaged or not an ONNX file at all
        raise ValueError(f"{path} is not a readable ONNX model: {error}") from None
    return decode_metadata({p.key: p.value for p in graph.metadata_props})
