"""OpenVINO IR export (FP32/FP16) and the runner with explicit inference precision."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lrformer_edge
from lrformer_edge.export.onnx import ParityError, ParityThresholds
from lrformer_edge.models.reference_weights import manifest_of, reference_state_dict
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.runners import load_runner

pytest.importorskip("openvino", reason="needs the openvino extra: pip install 'lrformer-edge[openvino]'")

from lrformer_edge.export.openvino import export_openvino  # noqa: E402
from lrformer_edge.runners.openvino import OpenVINORunner  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    model = lrformer_edge.create_model("lrformer-test")
    model.load_state_dict(reference_state_dict(manifest_of(model)))
    return model


@pytest.fixture(scope="module")
def fp32_ir(tiny, tmp_path_factory):
    return export_openvino(tiny, tmp_path_factory.mktemp("ov") / "fp32", (64, 96), "fp32")


def test_fp32_ir_matches_pytorch_and_records_metadata(fp32_ir):
    assert fp32_ir.parity.max_abs < 1e-4 and fp32_ir.parity.pixel_agreement == 1.0
    assert fp32_ir.path.with_suffix(".bin").is_file()
    with load_runner(fp32_ir.path.parent) as runner:  # the folder is enough
        assert isinstance(runner, OpenVINORunner)
        meta = runner.metadata
        assert meta["variant"] == "lrformer-test" and meta["weights_precision"] == "fp32"
        assert meta["input_size"] == [64, 96] and len(meta["class_names"]) == 150


@pytest.mark.parametrize("hint, expected", [("f32", "f32"), ("bf16", None)])
def test_precision_is_explicit_and_reported(fp32_ir, hint, expected):
    with OpenVINORunner(fp32_ir.path, precision=hint, threads=1) as runner:
        runner.infer({"input": np.zeros((1, 3, 64, 96), np.float32)})
        settings = runner.settings
    assert settings["requested_precision"] == hint and settings["threads"] == 1
    # bf16 runs natively only where the CPU has it; whatever was used is reported, never hidden.
    assert settings["inference_precision"] == (expected or settings["inference_precision"])
    assert settings["inference_precision"] in ("f32", "bf16", "f16")


def test_fp16_ir_keeps_decisions(tiny, tmp_path):
    result = export_openvino(tiny, tmp_path / "fp16", (64, 96), "fp16")
    assert result.parity.pixel_agreement > 0.995 and result.parity.cosine > 0.9999
    assert result.metadata["weights_precision"] == "fp16"


def test_failed_parity_leaves_no_folder(tiny, tmp_path):
    with pytest.raises(ParityError):
        export_openvino(tiny, tmp_path / "bad", (64, 64), parity=ParityThresholds(min_cosine=2))
    assert list(tmp_path.iterdir()) == []


def test_runner_rejects_unknown_settings(fp32_ir):
    with pytest.raises(ValueError, match="precision must be one of"):
        OpenVINORunner(fp32_ir.path, precision="int4")
    with pytest.raises(ValueError, match="mode must be one of"):
        OpenVINORunner(fp32_ir.path, mode="fast")


def test_pipeline_over_the_ir(fp32_ir, tiny, rgb_image):
    with SegmentationPipeline.from_artifact(fp32_ir.path) as pipeline:
        labels = pipeline(rgb_image)
    reference = SegmentationPipeline.from_model(tiny, input_size=(64, 96))(rgb_image)
    assert (labels == reference).mean() > 0.999


def test_to_openvino_cli(tmp_path):
    command = [sys.executable, str(REPO / "export_scripts" / "to_openvino.py"), "--variant",
               "lrformer-test", "--input-size", "64", "64", "--output", str(tmp_path / "ir")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "compiles under the f32, bf16 and f16" in result.stdout
    bad = subprocess.run(command[:-2] + ["--precision", "int8", "--output", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
