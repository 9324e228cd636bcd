"""Bad input to the command-line tools: one clear line on stderr, exit code 2, no traceback,
nothing written, and (where work is expensive) the refusal comes before the work."""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lrformer_edge.registry import get_config
from lrformer_edge.resources import (
    GIB,
    MEMORY_CAP_VARIABLE,
    available_memory_bytes,
    check_memory,
    estimate_memory,
    largest_fitting_size,
    memory_model,
)

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args, cwd: Path, env: dict | None = None, timeout=600):
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def error_line(result) -> str:
    """The one line that says what was wrong (asserting rc 2 and no traceback)."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


def nothing_in(folder: Path, *allowed: str) -> bool:
    return sorted(p.name for p in folder.iterdir() if p.name not in allowed) == []


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "street.png"
    cv2.imwrite(str(path), np.zeros((48, 64, 3), np.uint8))
    return path


# ----------------------------------------------------------------------------- checkpoints


def test_segment_names_a_missing_checkpoint(tmp_path, image):
    done = run("deploy/segment.py", str(image), "--output", "out", "--checkpoint", "gone.pth",
               cwd=tmp_path)
    line = error_line(done)
    assert "gone.pth" in line and "does not exist" in line
    assert nothing_in(tmp_path, image.name)


def test_deploy_parity_lists_the_keys_of_a_checkpoint_that_does_not_fit(tmp_path):
    torch.save({"foo": torch.zeros(3)}, tmp_path / "wrong.pth")
    done = run("deploy/deploy_parity.py", "--variant", "lrformer-test", "--checkpoint",
               "wrong.pth", "--sizes", "64x64", cwd=tmp_path)
    line = error_line(done)
    assert "wrong.pth does not match the model" in line
    assert "unexpected keys: foo" in done.stderr


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    from lrformer_edge.data.procedural import write_ade20k_layout

    return write_ade20k_layout(tmp_path / "data", {"training": range(2), "validation": range(2, 3)},
                               (64, 64))


def test_train_refuses_a_missing_checkpoint_before_making_the_work_dir(tmp_path, tiny_dataset):
    done = run("calibration/train.py", "--variant", "lrformer-test", "--data", str(tiny_dataset),
               "--work-dir", "runs", "--checkpoint", "gone.pth", "--crop-size", "64", "64",
               "--iters", "1", cwd=tmp_path)
    assert "gone.pth" in error_line(done)
    assert not (tmp_path / "runs").exists()


def test_train_refuses_a_crop_size_that_is_not_a_multiple_of_32(tmp_path, tiny_dataset):
    done = run("calibration/train.py", "--variant", "lrformer-test", "--data", str(tiny_dataset),
               "--work-dir", "runs", "--crop-size", "0", "0", "--iters", "1", cwd=tmp_path)
    line = error_line(done)
    assert "crop_size 0x0" in line and "multiples of 32" in line and "32x32" in line
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- damaged artifacts


def test_to_tensorrt_from_a_corrupt_onnx(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(np.random.default_rng(0).bytes(4000))
    done = run("export_scripts/to_tensorrt.py", "--from-onnx", "bad.onnx", "--int8",
               "--onnx-only", cwd=tmp_path)
    assert "bad.onnx is not a readable ONNX model" in error_line(done)
    assert nothing_in(tmp_path, "bad.onnx")


@pytest.mark.parametrize("content", [b"\x00\x81garbage" * 100, b'<?xml version="1.0"?><net',
                                     b'<?xml version="1.0"?><html></html>'])
def test_profile_openvino_on_a_corrupt_ir(tmp_path, content):
    pytest.importorskip("openvino")
    (tmp_path / "model.xml").write_bytes(content)
    done = run("deploy/profile_openvino.py", "--ir", "model.xml", "--json", "p.json",
               cwd=tmp_path)
    assert "model.xml is not an OpenVINO IR" in error_line(done)
    assert done.stderr.count("\n") == 1  # and no log lines of OpenVINO's other frontends
    assert nothing_in(tmp_path, "model.xml")


def test_validate_reports_a_corrupt_onnx_as_an_error_row(tmp_path):
    """README: a failing artifact is an ``error`` row with the message; the gate fails (1)."""
    (tmp_path / "bad.onnx").write_bytes(np.random.default_rng(0).bytes(4000))
    done = run("deploy/validate.py", "--artifacts", "bad.onnx", "--images", "1",
               "--input-size", "64", "64", "--report", "r", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "bad.onnx" in done.stderr and "not a readable ONNX model" in done.stderr
    import json

    rows = json.loads((tmp_path / "r/report.json").read_text())["results"]
    assert rows[-1]["status"] == "error" and "not a readable ONNX model" in rows[-1]["reason"]


def test_validate_names_a_missing_data_folder(tmp_path):
    weights = get_config("lrformer-t.procedural").default_checkpoint
    done = run("deploy/validate.py", "--artifacts", weights, "--data", "nowhere", "--report", "r",
               cwd=tmp_path)
    line = error_line(done)
    assert "dataset root nowhere does not exist" in line
    assert not (tmp_path / "r").exists()
    from lrformer_edge.data.datasets import DatasetError, open_dataset

    with pytest.raises(DatasetError, match="is a file, not a folder"):
        open_dataset(REPO / "README.md", "val")


# ----------------------------------------------------------------------------- option values


def test_model_summary_refuses_zero_classes(tmp_path):
    line = error_line(run("deploy/model_summary.py", "--num-classes", "0", cwd=tmp_path))
    assert "--num-classes" in line and "positive" in line and "got 0" in line


def test_model_summary_refuses_a_size_beyond_this_machines_memory(tmp_path):
    done = run("deploy/model_summary.py", "--input-size", "100000", "100000", cwd=tmp_path)
    line = error_line(done)
    assert "100000x100000 needs about" in line and "GiB are available" in line
    assert "the largest size of this aspect ratio that fits is" in line
    assert done.stdout == ""  # refused before the table starts


def test_make_dataset_size_zero_writes_nothing(tmp_path):
    done = run("calibration/make_dataset.py", "--output", "data", "--size", "0", "0",
               "--train", "1", "--val", "1", cwd=tmp_path)
    line = error_line(done)
    assert "--size" in line and "at least 32x32" in line and "got 0x0" in line
    assert not (tmp_path / "data").exists()


def test_quickstart_names_the_nearest_valid_size_before_any_work(tmp_path):
    start = time.time()
    done = run("deploy/quickstart.py", "--size", "500", "500", "--output", "q", cwd=tmp_path)
    line = error_line(done)
    assert "500x500" in line and "multiples of 32" in line and "512x512" in line
    assert not (tmp_path / "q").exists() and time.time() - start < 60


def test_exporter_refuses_a_size_beyond_this_machines_memory(tmp_path):
    done = run("export_scripts/to_onnx.py", "--variant", "lrformer-test", "--input-size",
               "100000", "100000", "--output", "m.onnx", cwd=tmp_path)
    line = error_line(done)
    assert "exporting lrformer-test at 100000x100000 needs about" in line
    assert "available" in line and "fits is" in line
    assert nothing_in(tmp_path)


def test_segment_refuses_an_image_beyond_the_memory_cap(tmp_path):
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), np.zeros((1024, 1024, 3), np.uint8))
    done = run("deploy/segment.py", "big.png", "--output", "out", cwd=tmp_path,
               env={MEMORY_CAP_VARIABLE: "0.05"})
    line = error_line(done)
    assert "segmenting big.png at 1024x1024 needs about" in line and "52 MiB are available" in line
    assert "the largest image of this aspect ratio that fits is" in line
    assert not (tmp_path / "out").exists() or nothing_in(tmp_path / "out")


def test_benchmark_checks_calibration_images_before_exporting(tmp_path):
    calibration = tmp_path / "calib"
    calibration.mkdir()
    cv2.imwrite(str(calibration / "good.png"), np.zeros((64, 64, 3), np.uint8))
    (calibration / "broken.jpg").write_bytes(b"not a jpeg")
    done = run("deploy/benchmark.py", "--variant", "lrformer-test", "--input-size", "64", "64",
               "--calib-data", "calib", "--calib-images", "2", "--output", "bench", cwd=tmp_path)
    line = error_line(done)
    assert "broken.jpg" in line and "cannot read image" in line
    assert "exporting" not in done.stdout and not (tmp_path / "bench").exists()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "export_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refused(module, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


# (script, the flags that make it calibrate, those of an export that does not, --output)
EXPORTERS = [
    ("to_openvino", ["--precision", "int8"], ["--precision", "fp32"], "ir"),
    ("to_tensorrt", ["--int8"], ["--fp16"], "m.engine"),
    ("to_coreml", ["--w8a8"], [], "m.mlpackage"),
]


@pytest.mark.parametrize("name, calibrates, plain, output", EXPORTERS,
                         ids=[e[0] for e in EXPORTERS])
def test_every_exporter_takes_the_same_calibration_arguments(tmp_path, capsys, name, calibrates,
                                                             plain, output):
    from lrformer_edge.cli import calibration_source
    from lrformer_edge.data.calibration import DEFAULT_CALIBRATION_IMAGES, PROCEDURAL

    module = _script(name)
    out = ["--output", str(tmp_path / output)]
    args = module.parse_args([*calibrates, *out])
    assert (args.calib_images, args.seed, args.calib_data) == (DEFAULT_CALIBRATION_IMAGES, 0, None)
    assert calibration_source(args) == PROCEDURAL  # an exporter has no dataset of its own
    assert module.parse_args([*calibrates, "--calib-data", "data/ade", *out]).calib_data == \
        "data/ade"
    error = _refused(module, [*calibrates, "--calib-images", "0", *out], capsys)
    assert "--calib-images must be positive, got 0" in error
    error = _refused(module, [*plain, "--calib-data", "data/ade", *out], capsys)
    assert "--calib-data applies to" in error and "only" in error


@pytest.mark.parametrize("name, flags, output", [
    ("to_onnx", [], "m.onnx"), *((e[0], e[1], e[3]) for e in EXPORTERS)],
    ids=["to_onnx", *(e[0] for e in EXPORTERS)])
def test_every_exporter_takes_validate(tmp_path, capsys, name, flags, output):
    from lrformer_edge.cli import VALIDATION_IMAGES

    module = _script(name)
    out = ["--output", str(tmp_path / output)]
    assert module.parse_args([*flags, *out]).validate is None
    assert module.parse_args([*flags, "--validate", *out]).validate == VALIDATION_IMAGES
    assert module.parse_args([*flags, "--validate", "7", *out]).validate == 7
    error = _refused(module, [*flags, "--validate", "0", *out], capsys)
    assert "--validate needs a positive number of images" in error


def test_to_onnx_validate_needs_one_image_batches(tmp_path, capsys):
    error = _refused(_script("to_onnx"), ["--validate", "--batch-size", "2", "--output",
                                          str(tmp_path / "m.onnx")], capsys)
    assert "--validate runs one image at a time" in error


# ----------------------------------------------------------------------------- library


def test_a_small_calibration_folder_is_used_with_a_warning(tmp_path, caplog):
    from lrformer_edge.data.calibration import build_calibration_set

    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((40, 40, 3), 50 * i, np.uint8))
    with caplog.at_level(logging.WARNING):
        calibration = build_calibration_set(str(tmp_path), get_config("lrformer-test").data,
                                            (64, 64), count=300)
    assert len(calibration.batches) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "gave 2 images, 300 were asked for" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_calibration_set(str(tmp_path), get_config("lrformer-test").data, (64, 64), count=2)
    assert not caplog.records  # enough images: silent


def test_memory_estimate_grows_with_pixels_classes_and_calibration():
    tiny, t, t150 = (get_config(n) for n in ("lrformer-test", "lrformer-t.procedural",
                                             "lrformer-t"))
    assert estimate_memory(t, (1024, 1024)) > estimate_memory(t, (512, 512))
    assert estimate_memory(t150, (512, 512)) > estimate_memory(t, (512, 512))  # 150 vs 12 classes
    assert estimate_memory(t, (512, 512), calibration_images=300) > estimate_memory(t, (512, 512))
    assert estimate_memory(tiny, (512, 512), "forward") < estimate_memory(tiny, (512, 512))
    # The measured points (see the module) lie below the estimate: lrformer-t, 12 classes,
    # 1014 MiB growth at 512x512 and 3337 MiB at 1024x1024; forward 235 MiB at 512x512.
    assert estimate_memory(t, (512, 512)) > 1014 * 2**20
    assert estimate_memory(t, (1024, 1024)) > 3337 * 2**20
    assert estimate_memory(t, (512, 512), "forward") > 235 * 2**20
    assert estimate_memory(t, (384, 384), calibration_images=16) > 1228 * 2**20  # OpenVINO INT8
    assert estimate_memory(t, (8000, 8000), "segment") > 6.5 * GIB  # the reported 8000x8000 peak


def test_check_memory_refuses_with_the_largest_size_that_fits():
    config = get_config("lrformer-t.procedural")
    budget = estimate_memory(config, (1024, 2048))
    assert check_memory(config, (1024, 2048), available=budget) == budget
    with pytest.raises(ValueError) as refused:
        check_memory(config, (2048, 4096), available=budget)
    message = str(refused.value)
    assert "at 2048x4096 needs about" in message and "fits is 1024x2048" in message
    fixed, per_pixel = memory_model(config, "export")
    fitted = largest_fitting_size((2048, 4096), budget, fixed, per_pixel)
    assert fitted == (1024, 2048) and all(v % 32 == 0 for v in fitted)
    with pytest.raises(ValueError, match="no size fits"):
        check_memory(config, (512, 512), available=fixed)
    assert available_memory_bytes() is None or available_memory_bytes() > 0


def test_memory_cap_variable(monkeypatch):
    monkeypatch.setenv(MEMORY_CAP_VARIABLE, "0.5")
    assert available_memory_bytes() <= GIB // 2
    monkeypatch.setenv(MEMORY_CAP_VARIABLE, "lots")
    with pytest.raises(ValueError, match=MEMORY_CAP_VARIABLE):
        available_memory_bytes()
