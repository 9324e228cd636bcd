"""The deploy form's forward pass as an explicit list of steps, for staged re-computation.

``deploy_steps(deployed)`` splits ``deployed(x)`` into: each backbone stage's patch embedding,
each backbone block, the decode head's three parts (fuse block 1 with the squeeze before it,
fuse block 2 with its squeeze, the classifier) and the final resize. Running the steps in order
computes exactly what ``deployed(x)`` computes (the same operations in the same order; a test
checks equality). Each step names the modules it calls, so ``first_step_of(steps, layer)`` is
the first step whose result a change to that layer can alter: a case that changes only that
layer can restart from a state cached just before it (the shared ``backbone.d_convsN.i`` are
first called by the first block of stage N).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lrformer_edge.models.deploy import channel_layer_norm


@dataclass(frozen=True)
class StepState:
    """What flows between steps: the current tensor, the backbone's finished stage outputs and
    the decode head's resized inputs (the tensors are never modified in place, so a cached state
    is safe to restart from)."""

    x: torch.Tensor
    features: tuple[torch.Tensor, ...] = ()
    selected: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[StepState], StepState]
    modules: tuple[str, ...]  # module-name prefixes whose layers this step calls

    def uses(self, layer: str) -> bool:
        return any(layer == prefix or layer.startswith(prefix + ".") for prefix in self.modules)


def deploy_steps(deployed) -> list[Step]:
    """The steps of ``deployed(x)`` (a model from ``to_deploy``), in order."""
    steps = []
    for stage, (patch_embed, blocks, d_convs) in enumerate(deployed.backbone.stages(), start=1):
        steps.append(Step(f"backbone.patch_embed{stage}", _embed(patch_embed),
                          (f"backbone.patch_embed{stage}",)))
        for index, block in enumerate(blocks):
            last = index == len(blocks) - 1
            modules = (f"backbone.block{stage}.{index}",)
            if index == 0:
                modules += (f"backbone.d_convs{stage}",)
            steps.append(Step(f"backbone.block{stage}.{index}", _block(block, d_convs, last),
                              modules))
    head = deployed.decode_head
    steps += [
        Step("decode_head.fuse_block1", _fuse_first(head),
             ("decode_head.squeeze1", "decode_head.fuse_block1")),
        Step("decode_head.fuse_block2", _fuse_second(head),
             ("decode_head.squeeze2", "decode_head.fuse_block2")),
        Step("decode_head.conv_seg", _classify(head), ("decode_head.conv_seg",)),
        Step("resize", _resize(deployed.deploy_input_size), ()),
    ]
    return steps


def first_step_of(steps: list[Step], layer: str) -> int:
    """Index of the first step that calls ``layer`` (a module name)."""
    for index, step in enumerate(steps):
        if step.uses(layer):
            return index
    raise ValueError(f"no step of the deploy form calls {layer!r}")


def run_steps(steps: list[Step], state: StepState, start: int = 0,
              keep: list | None = None) -> StepState:
    """Run ``steps[start:]`` from ``state``; ``keep`` receives the state before each step run
    (and the final one)."""
    for step in steps[start:]:
        if keep is not None:
            keep.append(state)
        state = step.run(state)
    if keep is not None:
        keep.append(state)
    return state


# ----------------------------------------------------------------------------- the steps
# Each mirrors DeployBackbone.forward, LRHead.forward and LRFormerSegmentor.forward.
def _embed(patch_embed):
    def run(state: StepState) -> StepState:
        return replace(state, x=channel_layer_norm(patch_embed.project(state.x),
                                                   patch_embed.norm))
    return run


def _block(block, d_convs, ends_stage: bool):
    def run(state: StepState) -> StepState:
        x = block(state.x, d_convs)
        features = state.features + (x,) if ends_stage else state.features
        return replace(state, x=x, features=features)
    return run


def _fuse_first(head):
    def run(state: StepState) -> StepState:
        selected = [state.features[i] for i in head.in_index]
        size = selected[0].shape[2:]
        selected = tuple(F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                         for f in selected)
        x = head.fuse_block1(head.squeeze1(torch.cat(selected, dim=1)))
        return replace(state, x=x, selected=selected)
    return run


def _fuse_second(head):
    def run(state: StepState) -> StepState:
        x = head.fuse_block2(head.squeeze2(torch.cat((state.x, state.selected[-1]), dim=1)))
        return replace(state, x=x)
    return run


def _classify(head):
    def run(state: StepState) -> StepState:
        return StepState(head.conv_seg(head.dropout(state.x)))
    return run


def _resize(size):
    def run(state: StepState) -> StepState:
        return StepState(F.interpolate(state.x, size=size, mode="bilinear", align_corners=False))
    return run
