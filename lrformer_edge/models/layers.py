"""The layers a precision choice is made for: every convolution and linear layer of LRFormer,
named as in the model (``to_deploy`` keeps module names, so the reference model, the deploy form
and every checkpoint's state-dict keys agree on them).

The sensitivity analysis measures these layers, a precision config names them, and each backend
maps the names onto its own graph (``lrformer_edge.backends.layer_names``).
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

LAYER_KINDS = ("conv", "depthwise", "linear")


@dataclass(frozen=True)
class Layer:
    name: str  # module name, e.g. "backbone.block1.0.mlp.fc1"
    kind: str  # one of LAYER_KINDS
    weight_elements: int
    out_channels: int

    @property
    def weight_bytes_fp16(self) -> int:
        return 2 * self.weight_elements


def layer_kind(module) -> str | None:
    """"conv", "depthwise" or "linear" for a layer a precision choice applies to, else None."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        return "depthwise" if depthwise else "conv"
    return None


def quantizable_layers(model) -> tuple[Layer, ...]:
    """Every convolution and linear layer of ``model`` (reference or deploy form), in module
    order."""
    layers = []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is not None:
            layers.append(Layer(name, kind, module.weight.numel(), module.weight.shape[0]))
    return tuple(layers)


def check_layer_names(model, names: Iterable[str], what: str = "precision config") -> None:
    """Refuse names that are not layers of ``model``, naming the closest ones."""
    known = [layer.name for layer in quantizable_layers(model)]
    known_set = set(known)
    unknown = [name for name in names if name not in known_set]
    if not unknown:
        return
    hints = []
    for name in unknown[:3]:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"the {what} names {len(unknown)} layer(s) that {model.config.name} does not "
                     f"have: {', '.join(hints)}{' ...' if len(unknown) > 3 else ''}; expected "
                     f"names of its {len(known)} convolution and linear layers, e.g. {known[0]!r}")


def layer_macs(model, input_size) -> dict[str, int]:
    """Multiply-accumulates per image of every layer of ``model`` (a deploy form: its shapes
    are static) at ``input_size``; a layer called several times (the shared ``d_convsN.i``)
    counts every call. A proxy for what keeping a layer in float costs in latency."""
    import torch
    from torch import nn

    macs: dict[str, int] = {}

    def counter(name):
        def count(module, inputs, output):
            per_output = (module.weight[0].numel() if isinstance(module, nn.Conv2d)
                          else module.in_features)
            macs[name] = macs.get(name, 0) + output[0].numel() * per_output
        return count

    handles = [module.register_forward_hook(counter(name))
               for name, module in model.named_modules() if layer_kind(module) is not None]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size))
    finally:
        for handle in handles:
            handle.remove()
    return macs
