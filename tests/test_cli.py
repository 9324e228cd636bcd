"""The command-line tools, run as a user runs them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from lrformer_edge.data.procedural import generate_scene

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
