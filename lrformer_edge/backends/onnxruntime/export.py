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
from pathlib import Path

from lrformer_edge.artifacts.metadata import artifact_metadata, decode_metadata
from lrformer_edge.artifacts.parity import (
    INPUT_NAME,
    OUTPUT_NAME,
    ParityThresholds,
    check_parity,
    parity_inputs,
)
from lrformer_edge.artifacts.result import ExportResult
from lrformer_edge.backends.onnxruntime.format import op_histogram
from lrformer_edge.files import atomic_write, check_output_file
from lrformer_edge.progress import heartbeat
from lrformer_edge.registry import input_size_of

MAX_OPSET = 20  # newest opset TensorRT 10.x parses
MIN_OPSET = 17  # LayerNormalization


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
    input_size = check_input_size(input_size_of(model, input_size))
    output = Path(output)
    if output.suffix != ".onnx":
        raise ValueError(f"output must end in .onnx, got {output}")
    check_output_file(output)
    start = time.time()
    deployed = to_deploy(model, input_size)
    example = torch.from_numpy(parity_inputs(input_size, batch_size or 1))
    with tempfile.TemporaryDirectory(prefix="lrformer-onnx-") as tmp:
        raw = Path(tmp) / "model.onnx"
        # Without autograd, tracing keeps no activations for a backward pass (peak RSS of the
        # LRFormer-T export at 512x512: 1.66 -> 0.87 GB).
        with heartbeat(f"ONNX export of {output.name}"), warnings.catch_warnings(), \
                torch.no_grad():
            warnings.simplefilter("ignore")  # tracer chatter about constant sizes is expected
            torch.onnx.export(
                deployed, (example,), str(raw), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes=None if batch_size else {INPUT_NAME: {0: "batch"},
                                                      OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True)
        graph = onnx.load(str(raw))
        if simplify:
            with heartbeat(f"onnxsim on {output.name}"):
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
            agreement = check_onnx_parity(deployed, checked, example.numpy(), parity,
                                          output.name)
        atomic_write(output, lambda tmp_path: Path(tmp_path).write_bytes(checked.read_bytes()))
    return ExportResult(output, agreement, time.time() - start, op_histogram(graph),
                        decode_metadata(metadata))


def check_onnx_parity(reference, path: Path, feed, parity: ParityThresholds | None, name: str):
    """``check_parity`` of the ONNX at ``path`` in ONNX Runtime's CPU provider (for every
    exporter that writes an ONNX: this one and the ONNX-based backends)."""
    from lrformer_edge.backends.onnxruntime.runner import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"])
    return check_parity(reference, runner, feed, parity, name)


def _simplify(graph):
    try:
        import onnxsim
    except ImportError:
        raise ImportError("--simplify needs onnxsim: pip install onnxsim") from None
    simplified, ok = onnxsim.simplify(graph)
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model")
    return simplified


