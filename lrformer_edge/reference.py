"""Checks against the official implementation's golden outputs (``shared/reference``).

The reference README defines deterministic weights and two inputs; a faithful model reproduces
the sampled logits within ``1e-5 * max|logits|`` and the argmax wherever the top-2 margin exceeds
twice that tolerance.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from lrformer_edge.models.checkpoint import load_into
from lrformer_edge.models.reference_weights import (
    reference_state_dict,
    weights_fingerprint,
)

# A checkout keeps ``shared/`` beside the repository; LRFORMER_EDGE_REFERENCE overrides it.
DEFAULT_REFERENCE_DIR = Path(os.environ.get(
    "LRFORMER_EDGE_REFERENCE",
    Path(__file__).resolve().parents[2] / "shared" / "reference"))


def load_manifest(path: str | Path) -> list[tuple[str, tuple[int, ...], str]]:
    return [(key, tuple(shape), dtype) for key, shape, dtype in json.loads(Path(path).read_text())]


def reference_model(variant: str, manifest) -> torch.nn.Module:
    """``variant`` with the deterministic reference weights of ``manifest`` loaded strictly."""
    from lrformer_edge.models.factory import create_model

    state_dict = reference_state_dict(manifest)
    num_classes = int(dict((k, s) for k, s, _ in manifest)["decode_head.conv_seg.weight"][0])
    model = create_model(variant, num_classes=num_classes, pretrained=False)
    load_into(model, state_dict, source=f"reference weights of {variant}")
    model.reference_fingerprint = weights_fingerprint(state_dict)
    return model


def compare_with_golden(model: torch.nn.Module, golden) -> list[dict]:
    """Per stored input: max error of sampled logits, tolerance, argmax agreement on safe pixels."""
    stride = int(golden["sample_stride"])
    rtol = float(golden["tolerance_rtol"])
    cases = []
    for index in range(len(golden["input_shapes"])):
        x = torch.from_numpy(golden[f"x_{index}"])
        with torch.no_grad():
            logits = model(x).numpy()
        expected = golden[f"logits_sampled_{index}"]
        tolerance = rtol * float(np.abs(expected).max())
        error = float(np.abs(logits[:, :, ::stride, ::stride] - expected).max())
        safe = golden[f"argmax_margin_{index}"].astype(np.float32) > 2 * tolerance
        agreement = float((logits[0].argmax(0) == golden[f"argmax_{index}"])[safe].mean())
        cases.append({"shape": list(x.shape), "max_abs_error": error, "tolerance": tolerance,
                      "argmax_agreement": agreement, "safe_pixels": float(safe.mean()),
                      "passed": error <= tolerance and agreement == 1.0})
    return cases


def check_against_golden(reference_dir: str | Path = DEFAULT_REFERENCE_DIR,
                         variant: str = "lrformer-t") -> dict:
    reference_dir = Path(reference_dir)
    golden = np.load(reference_dir / f"{variant}.golden.npz")
    model = reference_model(variant, load_manifest(reference_dir / f"{variant}.keys.json"))
    fingerprint_ok = bool(np.allclose(model.reference_fingerprint, golden["weights_fingerprint"],
                                      rtol=1e-9))
    cases = compare_with_golden(model, golden)
    return {"variant": variant, "fingerprint_matches": fingerprint_ok, "cases": cases,
            "passed": fingerprint_ok and all(c["passed"] for c in cases)}
