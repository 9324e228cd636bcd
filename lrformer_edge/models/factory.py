"""``create_model``: registry name (+ optional checkpoint) -> ready-to-run model in eval mode."""
from __future__ import annotations

import os
from pathlib import Path

from lrformer_edge import registry
from lrformer_edge.files import file_sha256
from lrformer_edge.models.checkpoint import (
    CheckpointError,
    load_into,
    num_classes_in,
    read_state_dict,
)
from lrformer_edge.models.lrformer import LRFormerSegmentor


def model_config(name: str, num_classes: int | None = None) -> registry.ModelConfig:
    """The registry config of ``name``, adapted to ``num_classes`` where that differs.

    A class count that matches a sibling variant of the same architecture (e.g. 19 classes for
    ``lrformer-t`` -> ``lrformer-t.cityscapes``) takes that variant, with its class names.
    """
    config = registry.get_config(name)
    if num_classes is None or num_classes == config.num_classes:
        return config
    base = name.split(".")[0]
    for sibling in registry.list_models(f"{base}*"):
        candidate = registry.get_config(sibling)
        if candidate.arch == config.arch and candidate.num_classes == num_classes:
            return candidate
    return registry.with_num_classes(config, num_classes)


def variant_note(requested: str, config: registry.ModelConfig,
                 from_checkpoint: bool) -> str | None:
    """One line saying that a class count chose another variant than ``requested``, else None."""
    if config.name == requested:
        return None
    why = (f"checkpoint has {config.num_classes} classes" if from_checkpoint
           else f"num_classes={config.num_classes}")
    height, width = config.data.native_size
    return f"{why}: using variant {config.name} (native size {height}x{width})"


def create_model(name: str, checkpoint: str | os.PathLike | None = None,
                 num_classes: int | None = None, strict: bool = True,
                 pretrained: bool = True, drop_path_rate: float = 0.0) -> LRFormerSegmentor:
    """Build a registered LRFormer, optionally loading a checkpoint, in eval mode.

    ``forward(x)`` maps normalised pixels (B, 3, H, W) to logits (B, num_classes, H, W).
    Without ``num_classes`` the class count is read from the checkpoint. The model's
    ``config`` (architecture, classes, palette, mean/std) and ``checkpoint_sha256`` travel
    with it into every artifact exported from it. Variants with bundled weights (the
    procedural default) load them unless ``pretrained=False``.

    A class count that selects another variant (19 classes turn ``lrformer-t`` into
    ``lrformer-t.cityscapes``, with another native size) is not silent: ``model.requested_variant``
    keeps the name asked for, ``model.variant_note`` says what happened (None when nothing did);
    the export commands print it and the artifact metadata records both names.
    """
    state_dict = None
    source = None
    from_checkpoint = False
    bundled = registry.get_config(name).default_checkpoint
    if checkpoint is None and pretrained and bundled:
        if not Path(bundled).is_file():
            raise CheckpointError(f"the bundled weights of {name} are missing ({bundled}); "
                                  f"reinstall lrformer-edge or pass checkpoint=...")
        checkpoint = bundled
    if checkpoint is not None:
        source = Path(checkpoint)
        state_dict = read_state_dict(source)
        found = num_classes_in(state_dict)
        if num_classes is not None and found is not None and found != num_classes:
            raise CheckpointError(
                f"{source} has a {found}-class head but num_classes={num_classes} was asked for; "
                f"leave num_classes unset to use the checkpoint's {found} classes"
            )
        from_checkpoint = num_classes is None and found is not None
        num_classes = num_classes or found
    config = model_config(name, num_classes)
    model = LRFormerSegmentor(config.arch, config.num_classes, drop_path_rate=drop_path_rate)
    if state_dict is not None:
        load_into(model, state_dict, strict=strict, source=str(source))
    model.config = config
    model.requested_variant = name
    model.variant_note = variant_note(name, config, from_checkpoint)
    model.checkpoint_path = str(source) if source else None
    model.checkpoint_sha256 = file_sha256(source) if source else None
    return model.eval()
