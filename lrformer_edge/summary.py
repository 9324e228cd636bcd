"""Model size and compute: parameters and multiply-accumulates at a given input size."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lrformer_edge.models.deploy import check_input_size
from lrformer_edge.models.factory import create_model
from lrformer_edge.registry import input_size_of
from lrformer_edge.resources import check_memory


@dataclass
class ModelSummary:
    variant: str
    num_classes: int
    input_size: tuple[int, int]
    parameters: int
    gmacs: float

    def format(self) -> str:
        return (f"{self.variant}: {self.parameters / 1e6:.2f} M parameters, "
                f"{self.gmacs:.2f} GMACs at {self.input_size[0]}x{self.input_size[1]} "
                f"({self.num_classes} classes)")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: torch.nn.Module, input_size: tuple[int, int]) -> float:
    """GMACs of one forward pass: convolutions, linear layers and attention matmuls.

    torch's FlopCounterMode counts 2 FLOPs per MAC; papers (LRFormer's "17G" included) report
    MACs as FLOPs, so we halve it. Norms, activations and pooling are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, *input_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2e9


def summarize(variant: str, input_size: tuple[int, int] | None = None,
              num_classes: int | None = None) -> ModelSummary:
    """Parameters and GMACs of ``variant`` at ``input_size`` (default: its native size)."""
    model = create_model(variant, num_classes=num_classes, pretrained=False)
    input_size = check_input_size(input_size_of(model, input_size))
    check_memory(model, input_size, "forward", what=f"counting the GMACs of {variant}")
    return ModelSummary(variant, model.num_classes, tuple(input_size),
                        count_parameters(model), count_gmacs(model, input_size))
