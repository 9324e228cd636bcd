"""Faithfulness of the reference model to the official LRFormer release."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lrformer_edge
from lrformer_edge.models.reference_weights import manifest_of, reference_state_dict
from lrformer_edge.reference import (
    check_against_golden,
    compare_with_golden,
    load_manifest,
    reference_model,
)
from lrformer_edge.summary import count_gmacs, count_parameters


def test_official_manifest_matches_our_state_dict_exactly(reference_dir):
    manifest = load_manifest(reference_dir / "lrformer-t.keys.json")
    model = lrformer_edge.create_model("lrformer-t")
    assert manifest_of(model) == manifest  # keys, shapes, dtypes and order
    assert len(manifest) == 417


def test_lrformer_t_reproduces_official_golden_outputs(reference_dir):
    result = check_against_golden(reference_dir, "lrformer-t")
    assert result["fingerprint_matches"], "reference weight generator differs from the README"
    assert len(result["cases"]) == 2
    for case in result["cases"]:
        assert case["max_abs_error"] <= case["tolerance"], case
        assert case["argmax_agreement"] == 1.0, case
    assert result["passed"]


def test_golden_check_detects_a_single_perturbed_tensor(reference_dir):
    """The check is sensitive: re-drawing one tensor must break it."""
    manifest = load_manifest(reference_dir / "lrformer-t.keys.json")
    model = reference_model("lrformer-t", manifest)
    with torch.no_grad():
        weight = model.backbone.block3[2].attn.kv[0].weight
        weight.copy_(torch.roll(weight, 1, dims=0))
    cases = compare_with_golden(model, np.load(reference_dir / "lrformer-t.golden.npz"))
    assert not any(case["passed"] for case in cases)


@pytest.mark.parametrize("variant, expected_millions", [
    ("lrformer-t", 13.26), ("lrformer-s", 32.22), ("lrformer-b", 67.51), ("lrformer-l", 110.98),
])
def test_parameter_counts_match_the_paper(variant, expected_millions):
    model = lrformer_edge.create_model(variant)
    params = count_parameters(model) / 1e6
    assert abs(params - expected_millions) / expected_millions < 0.002, params


def test_lrformer_t_gmacs_at_512():
    gmacs = count_gmacs(lrformer_edge.create_model("lrformer-t"), (512, 512))
    assert 16.0 < gmacs < 17.2, gmacs


@pytest.mark.parametrize("variant, classes", [
    ("lrformer-t.cityscapes", 19), ("lrformer-s.coco-stuff", 171), ("lrformer-b", 150),
])
def test_dataset_variants_have_the_right_heads(variant, classes):
    config = lrformer_edge.get_config(variant)
    assert config.num_classes == classes == len(config.data.palette)
    model = lrformer_edge.create_model(variant)
    assert model.decode_head.conv_seg.out_channels == classes


def test_every_variant_is_self_consistent_with_reference_weights():
    """S/B/L with hash-derived weights: finite logits at input size, batch-independent."""
    for variant in ("lrformer-s", "lrformer-b", "lrformer-l"):
        model = lrformer_edge.create_model(variant)
        model.load_state_dict(reference_state_dict(manifest_of(model)))
        x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            both = model(x)
            single = model(x[1:])
        assert both.shape == (2, 150, 64, 96)
        assert torch.isfinite(both).all()
        torch.testing.assert_close(both[1:], single, rtol=1e-4, atol=1e-4)


def test_forward_returns_logits_at_input_resolution(tiny_model):
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        logits = tiny_model(x)
    assert logits.shape == (2, 150, 96, 160)
    assert not tiny_model.training


@pytest.mark.parametrize("shape", [(1, 3, 100, 128), (1, 3, 128, 90)])
def test_sizes_not_multiple_of_32_are_rejected_with_advice(tiny_model, shape):
    with pytest.raises(ValueError, match="multiple of 32") as error:
        tiny_model(torch.zeros(shape))
    assert "preprocess" in str(error.value)


def test_bad_input_types_are_rejected(tiny_model):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_model(torch.zeros(1, 4, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        tiny_model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(KeyError, match="lrformer-t"):
        lrformer_edge.create_model("lrformer-xxl")
