"""The benchmark's ground-truth row: the model itself, PyTorch eager FP32."""
from __future__ import annotations

from lrformer_edge.backends.base import BenchmarkContext, Candidate


def candidates(context: BenchmarkContext) -> list[Candidate]:
    # PyTorch loads on call, not with the registry (see pytorch/__init__.py).
    from lrformer_edge.backends.pytorch.runner import TorchRunner

    model, input_size = context.model, context.input_size
    return [Candidate("PyTorch", "pytorch", "fp32",
                      lambda: TorchRunner(model, input_size=input_size))]
