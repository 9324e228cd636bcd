"""Validation harness and cross-backend regression gate.

``run_validation`` = samples -> FP32 PyTorch ground truth (computed, or loaded from a file saved
elsewhere) -> every artifact through the same pipeline -> gate against versioned thresholds ->
JSON / Markdown / HTML reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lrformer_edge.backends import resolve_backend_options
from lrformer_edge.registry import input_size_of


@dataclass
class ValidationConfig:
    artifacts: list[Path]
    report_dir: Path
    data: str | None = None  # dataset root; None: procedural held-out scenes
    images: int = 100
    variant: str | None = None
    reference_checkpoint: str | None = None
    input_size: tuple[int, int] | None = None
    thresholds: Path | None = None
    save_reference: Path | None = None
    load_reference: Path | None = None
    logit_images: int = 5
    # runtime option values by backend name (the backends' runtime_options), e.g.
    # {"openvino": {"precision": "bf16", "emulate_exact_int8": True}}; defaults for the rest
    backend_options: dict[str, dict] = field(default_factory=dict)
    require_all: bool = False
    log: object = field(default=print, repr=False)


@dataclass
class ValidationOutcome:
    run: object
    violations: list
    reports: dict


def reference_input_size(config: ValidationConfig, model) -> tuple[int, int]:
    """--input-size, else the first artifact that records one, else the model's native size."""
    if config.input_size:
        return tuple(config.input_size)
    from lrformer_edge.validation.harness import artifact_metadata_of

    for path in config.artifacts:
        try:
            size = (artifact_metadata_of(Path(path)) or {}).get("input_size")
        except Exception:  # noqa: BLE001 - an unreadable artifact becomes its error row later
            continue
        if size:
            return tuple(size)
    return input_size_of(model)


def run_validation(config: ValidationConfig) -> ValidationOutcome:
    from lrformer_edge.validation.gate import check, load_thresholds
    from lrformer_edge.validation.harness import validate_artifacts
    from lrformer_edge.validation.reference import ReferenceOutputs, compute_reference
    from lrformer_edge.validation.report import write_reports

    thresholds = load_thresholds(config.thresholds)
    backend_options = resolve_backend_options(config.backend_options)  # bad options: before work
    missing = [str(p) for p in config.artifacts if not Path(p).exists()]
    if missing:
        raise ValueError(f"artifacts not found: {', '.join(missing)}")
    if config.load_reference:
        reference = ReferenceOutputs.load(config.load_reference)
        size = tuple(reference.input_size)
        class_names = reference.model["class_names"]
        palette = _palette_for(reference.model)
    else:
        from lrformer_edge.models.factory import create_model
        from lrformer_edge.registry import BUNDLED_MODEL

        model = create_model(config.variant or BUNDLED_MODEL,
                             checkpoint=config.reference_checkpoint)
        size = reference_input_size(config, model)
        class_names, palette = model.config.data.class_names, model.config.data.palette
    from lrformer_edge.evaluation import load_samples

    samples, description = load_samples(config.data, config.images, size)
    if not config.load_reference:
        config.log(f"computing the FP32 PyTorch ground truth on {len(samples)} images at "
                   f"{size[0]}x{size[1]}")
        reference = compute_reference(model, samples, size, config.logit_images)
    if config.save_reference:
        reference.save(config.save_reference)
        config.log(f"saved the ground-truth outputs to {config.save_reference}")
    run = validate_artifacts(config.artifacts, samples, reference, description, class_names,
                             palette, backend_options, config.log)
    violations = check(run.results, thresholds, config.require_all)
    reports = write_reports(run, violations, thresholds.get("version"), config.report_dir)
    return ValidationOutcome(run, violations, reports)


def _palette_for(model_identity: dict):
    """The registered palette of the reference's variant, else a generated one."""
    from lrformer_edge.registry import get_config

    try:
        return get_config(model_identity["variant"]).data.palette
    except (KeyError, ValueError):
        from lrformer_edge.data.classes import distinct_palette

        return distinct_palette(model_identity["num_classes"])
