"""The command-line tools, run as a user runs them."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import lrformer_edge
from lrformer_edge.backends.onnxruntime.format import read_onnx_metadata
from lrformer_edge.data.procedural import generate_scene
from lrformer_edge.models.checkpoint import save_mmseg_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args, timeout=900):
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_model_summary_prints_params_and_gmacs():
    result = run("deploy/model_summary.py", "--variant", "lrformer-t", "--input-size", "512", "512")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("lrformer-t "))
    _, classes, params, gmacs, _ = row.split()
    assert classes == "150" and params == "13.26" and 16.0 < float(gmacs) < 17.2
    bad = run("deploy/model_summary.py", "--input-size", "500", "512")
    assert bad.returncode == 2 and "multiples of 32" in bad.stderr


def test_segment_writes_masks_and_overlays(tmp_path):
    scene = generate_scene(10_000_123, 200, 300)  # an unseen validation seed, odd size
    image_path = tmp_path / "street.png"
    cv2.imwrite(str(image_path), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
    result = run("deploy/segment.py", str(image_path), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    labels = cv2.imread(str(tmp_path / "out" / "street_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (200, 300)
    assert (labels == scene.label).mean() > 0.7  # the bundled model segments the scene
    assert (tmp_path / "out" / "street_overlay.jpg").is_file()
    assert "300x200 -> input" in result.stdout and "road" in result.stdout
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    bad = run("deploy/segment.py", str(tmp_path / "broken.jpg"), "--output", str(tmp_path / "o"))
    assert bad.returncode == 2 and "broken.jpg" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_quickstart_main_job(tmp_path):
    result = run("deploy/quickstart.py", "--images", "3", "--output", str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bundled_model"]["images"] == 3
    assert report["onnxruntime"]["pixel_agreement_vs_pytorch"] > 0.999
    if "faithfulness" in report:
        assert report["faithfulness"]["passed"]
    assert any(p.suffix == ".jpg" for p in tmp_path.iterdir())
    assert np.isfinite(report["bundled_model"]["mIoU"])


def test_deploy_parity_cli():
    result = run("deploy/deploy_parity.py", "--variant", "lrformer-test", "--reference-weights",
                 "--sizes", "64x96", "96x64", "--onnx")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("deploy: max-abs") == 2 and "onnxruntime: max-abs" in result.stdout
    bad = run("deploy/deploy_parity.py", "--sizes", "100x100")
    assert bad.returncode == 2 and "multiples of 32" in bad.stderr


def _validation_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if "procedural validation images" in line)


def test_to_onnx_says_which_variant_the_checkpoint_chose_and_validates(tmp_path):
    """A 19-class checkpoint given for a 150-class variant: the export says which variant it
    used and records both names; --validate compares the ONNX with FP32 PyTorch."""
    torch.manual_seed(0)
    source = lrformer_edge.create_model("lrformer-test", num_classes=19)
    save_mmseg_checkpoint(source.state_dict(), tmp_path / "nineteen.pth")
    done = run("export_scripts/to_onnx.py", "--variant", "lrformer-test", "--checkpoint",
               str(tmp_path / "nineteen.pth"), "--input-size", "64", "64", "--validate", "2",
               "--output", str(tmp_path / "m.onnx"))
    assert done.returncode == 0, done.stderr
    assert ("checkpoint has 19 classes: using variant lrformer-test[19 classes] (native size "
            "512x512)") in done.stdout.splitlines()
    metadata = read_onnx_metadata(tmp_path / "m.onnx")
    assert metadata["variant"] == "lrformer-test[19 classes]"
    assert metadata["requested_variant"] == "lrformer-test"
    line = _validation_line(done.stdout)
    assert line.startswith("ONNX model m.onnx on 2 procedural validation images: mIoU ")
    assert "FP32 PyTorch" in line and "points)" in line
    agreement = float(re.search(r"pixel agreement ([\d.]+)%", line).group(1))
    assert agreement > 99  # ONNX Runtime computes what PyTorch does


@pytest.mark.slow
@pytest.mark.parametrize("script, output, runs", [
    ("export_scripts/to_openvino.py", "ir", "OpenVINO IR lrformer-test.xml"),
    ("export_scripts/to_coreml.py", "m.mlpackage",
     "Core ML package m.mlpackage" if sys.platform == "darwin"
     else "PyTorch proxy of Core ML package m.mlpackage"),
], ids=["openvino", "coreml"])
def test_every_exporter_validates_the_same_way(tmp_path, script, output, runs):
    done = run(script, "--variant", "lrformer-test", "--input-size", "64", "64",
               "--validate", "2", "--output", str(tmp_path / output))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    line = _validation_line(done.stdout)
    assert line.startswith(f"{runs} on 2 procedural validation images: mIoU ")
    assert "FP32 PyTorch" in line and "pixel agreement" in line
