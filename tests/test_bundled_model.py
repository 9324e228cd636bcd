"""The bundled default model: present, loadable, and accurate on unseen procedural scenes."""
from __future__ import annotations

import numpy as np

import lrformer_edge
from lrformer_edge.evaluation import evaluate_pipeline, procedural_validation_samples
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.registry import BUNDLED_MODEL, get_config


def test_bundled_weights_are_shipped_in_half_precision():
    from safetensors import safe_open

    path = get_config(BUNDLED_MODEL).default_checkpoint
    with safe_open(path, "pt") as handle:
        dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys()}
    assert dtypes <= {"F16", "I64"}


def test_bundled_model_segments_unseen_scenes():
    model = lrformer_edge.create_model(BUNDLED_MODEL)
    assert model.config.data.class_names[0] == "sky" and model.num_classes == 12
    with SegmentationPipeline.from_model(model) as pipeline:
        metrics = evaluate_pipeline(pipeline, procedural_validation_samples(6))
    # The model card states the 100-image figure; 6 images only guard against regressions.
    assert metrics["mIoU"] > 0.7, metrics["mIoU"]
    assert np.nanmin(metrics["IoU"]) > 0.3
