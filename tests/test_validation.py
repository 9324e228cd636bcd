"""Validation harness, regression gate and reports, on real exports of the bundled model."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from browser import assert_renders_content, needs_chromium, rendered_dom

from lrformer_edge.backends.onnxruntime.export import export_onnx
from lrformer_edge.models.factory import create_model
from lrformer_edge.registry import BUNDLED_MODEL
from lrformer_edge.validation import ValidationConfig, run_validation
from lrformer_edge.validation.gate import Violation, check, load_thresholds
from lrformer_edge.validation.harness import BackendResult

REPO = Path(__file__).resolve().parents[1]
SIZE = (128, 128)
IMAGES = 6


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A good ONNX, a good OpenVINO IR, and an ONNX exported from a damaged checkpoint."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("validate")
    model = create_model(BUNDLED_MODEL)
    good_onnx = export_onnx(model, folder / "good.onnx", SIZE).path
    paths = {"onnx": good_onnx}
    try:
        from lrformer_edge.backends.openvino.export import export_openvino

        paths["openvino"] = export_openvino(model, folder / "good-ir", SIZE, "fp32").path.parent
    except ImportError:
        pass
    damaged = {k: v.clone() for k, v in model.state_dict().items()}
    key = "decode_head.conv_seg.weight"
    damaged[key] += 0.5 * torch.randn(damaged[key].shape, generator=torch.Generator().manual_seed(0))
    checkpoint = folder / "damaged.safetensors"
    save_file({k: v.contiguous() for k, v in damaged.items()}, str(checkpoint),
              metadata={"variant": BUNDLED_MODEL})
    broken = create_model(BUNDLED_MODEL, checkpoint=checkpoint)
    paths["damaged"] = export_onnx(broken, folder / "damaged.onnx", SIZE).path
    return paths


def _validate(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "deploy/validate.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=900)


def test_gate_passes_for_good_exports_and_writes_reports(artifacts, tmp_path):
    good = [artifacts["onnx"]] + ([artifacts["openvino"]] if "openvino" in artifacts else [])
    outcome = run_validation(ValidationConfig(good, tmp_path / "report", images=IMAGES,
                                              log=lambda *_: None))
    assert outcome.violations == []
    results = outcome.run.results
    assert results[0].backend == "pytorch" and len(results) == 1 + len(good)
    for result in results[1:]:
        assert result.status == "ok"
        assert result.pixel_agreement > 0.9999 and abs(result.miou_delta_points) < 0.02
        assert result.logits_max_abs < 1e-3 and result.logits_images == 5
        assert result.median_ms > 0 and result.throughput_fps > 0 and result.artifact_mib > 1
        assert len(result.per_class_iou) == 12 and result.peak_memory_mib is not None
    report = json.loads((tmp_path / "report/report.json").read_text())
    assert report["gate"]["passed"] and report["images"] == IMAGES
    from lrformer_edge.cpu import host_cpu

    assert report["cpu"]["isa"] == host_cpu().isa  # timings and INT8 accuracy depend on it
    assert results[1].settings["cpu_isa"] == host_cpu().isa
    markdown = (tmp_path / "report/report.md").read_text()
    assert "Gate: PASSED" in markdown and "onnxruntime" in markdown
    assert f"CPU: {host_cpu().describe()}" in markdown
    assert host_cpu().describe() in (tmp_path / "report/report.html").read_text()


def test_gate_fails_on_a_damaged_checkpoint_naming_the_metric(artifacts, tmp_path):
    done = _validate("--artifacts", str(artifacts["onnx"]), str(artifacts["damaged"]),
                     "--images", str(IMAGES), "--report", str(tmp_path / "r"), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "GATE FAILED" in done.stderr
    failing = [line for line in done.stderr.splitlines() if "damaged.onnx" in line]
    assert failing and any("pixel_agreement" in line and "limit" in line for line in failing)
    assert not any("good.onnx" in line for line in done.stderr.splitlines()
                   if "limit" in line)
    report = json.loads((tmp_path / "r/report.json").read_text())
    assert not report["gate"]["passed"]
    damaged = [r for r in report["results"] if r["artifact"].endswith("damaged.onnx")][0]
    assert "exported from checkpoint" in damaged["reason"]


def test_saved_reference_gates_a_device_without_pytorch(artifacts, tmp_path):
    reference = tmp_path / "ref.npz"
    saved = _validate("--artifacts", str(artifacts["onnx"]), "--images", str(IMAGES),
                      "--save-reference", str(reference), "--report", str(tmp_path / "a"),
                      cwd=tmp_path)
    assert saved.returncode == 0, saved.stderr
    # The device: PyTorch cannot be imported at all.
    script = ("import runpy, sys; sys.modules['torch'] = None; "
              f"sys.argv = ['validate.py', '--artifacts', {str(artifacts['onnx'])!r}, "
              f"'--images', '{IMAGES}', '--load-reference', {str(reference)!r}, "
              f"'--report', {str(tmp_path / 'b')!r}]; "
              f"runpy.run_path({str(REPO / 'deploy/validate.py')!r}, run_name='__main__')")
    device = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, timeout=900)
    assert device.returncode == 0, device.stderr
    first = json.loads((tmp_path / "a/report.json").read_text())["results"][1]
    second = json.loads((tmp_path / "b/report.json").read_text())["results"][1]
    assert second["pixel_agreement"] == pytest.approx(first["pixel_agreement"])
    assert second["logits_images"] == 5  # the first samples' logits travel with the file
    assert second["logits_max_abs"] == pytest.approx(first["logits_max_abs"])
    other_images = _validate("--artifacts", str(artifacts["onnx"]), "--images", "3",
                             "--load-reference", str(reference), "--report", str(tmp_path / "c"),
                             cwd=tmp_path)
    assert other_images.returncode == 2 and "computed on other images" in other_images.stderr


def test_unrunnable_artifacts_are_listed_as_skipped_with_the_reason(artifacts, tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine bytes")
    (tmp_path / "model.engine.json").write_text(json.dumps({"precision": "int8", "metadata": {}}))
    # (A Core ML package listed as skipped off macOS: tests/test_coreml.py.)
    outcome = run_validation(ValidationConfig([artifacts["onnx"], engine],
                                              tmp_path / "r", images=2, log=lambda *_: None))
    rows = {Path(r.artifact).name: r for r in outcome.run.results[1:]}
    from lrformer_edge.backends.tensorrt.engine import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is not None:
        assert rows["model.engine"].status == "skipped"
        assert "needs TensorRT and an NVIDIA GPU" in rows["model.engine"].reason
    assert outcome.violations == []  # skipped is reported, not failed...
    strict = check(outcome.run.results, load_thresholds(), require_all=True)
    skipped = [r for r in outcome.run.results if r.status == "skipped"]
    assert len(strict) == len(skipped) and all("skipped" in str(v) for v in strict)  # ...unless required


def test_thresholds_file_is_versioned_and_checked(tmp_path):
    assert load_thresholds()["version"] == 1
    bad = tmp_path / "t.yaml"
    bad.write_text("version: 1\nbackends:\n  openvino:\n    int8: {min_agreement: 0.9}\n")
    with pytest.raises(ValueError, match="unknown metrics"):
        load_thresholds(bad)
    bad.write_text("backends: {}\n")
    with pytest.raises(ValueError, match="version"):
        load_thresholds(bad)
    result = BackendResult("openvino int8 (x)", "x", "openvino", "int8", pixel_agreement=0.95,
                           miou_delta_points=-2.0, worst_class_drop={"class": "sky",
                                                                     "drop_points": 1.0})
    found = check([result], load_thresholds())
    assert {v.metric for v in found} == {"min_pixel_agreement", "max_miou_drop_points"}
    result.worst_class_drop = None  # a limit that cannot be checked is a failure, not a pass
    assert "max_class_iou_drop_points" in {v.metric for v in check([result], load_thresholds())}
    assert all(isinstance(v, Violation) and "openvino int8" in str(v) for v in found)


@needs_chromium
def test_html_report_renders_in_a_real_browser(artifacts, tmp_path):
    outcome = run_validation(ValidationConfig([artifacts["onnx"], artifacts["damaged"]],
                                              tmp_path / "r", images=3, log=lambda *_: None))
    page = outcome.reports["report.html"]
    html = rendered_dom(page)
    assert 'data-ready="ok"' in html  # every embedded image decoded
    images = int(html.split('data-images="')[1].split('"')[0])
    assert images == 3 * (3 + 2 * 2)  # image, truth, reference + mask and heatmap per artifact
    assert "<table id=\"results\"" in html and "damaged.onnx" in html
    assert "Gate failed" in html and "<svg" in html
    assert_renders_content(page, tmp_path)


def _thresholds(tmp_path, backends: str) -> Path:
    path = tmp_path / "gate.yaml"
    path.write_text(f"version: 1\nbackends:\n{backends}")
    return path


def test_a_typo_in_a_backend_key_is_refused_before_any_work(tmp_path):
    """A misspelt backend used to match no artifact, so the gate passed anything (25% agreement)."""
    thresholds = _thresholds(tmp_path, "  onnxrunt1me:\n    fp32: {min_pixel_agreement: 0.9999}\n")
    done = _validate("--artifacts", str(REPO / "README.md"), "--thresholds", str(thresholds),
                     "--report", str(tmp_path / "r"), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "unknown backend 'onnxrunt1me'" in done.stderr and "onnxruntime" in done.stderr
    assert "computing" not in done.stdout and not (tmp_path / "r").exists()


@pytest.mark.parametrize("entry, message", [
    ("  openvino:\n    int9: {min_pixel_agreement: 0.99}\n",
     "unknown precision 'int9' for backend openvino"),
    ("  onnxruntime:\n    fp32: {min_pixel_agreement: high}\n",
     "backends.onnxruntime.fp32.min_pixel_agreement must be a finite number, got 'high'"),
    ("  onnxruntime:\n    fp32: {min_pixel_agreement: true}\n",
     "min_pixel_agreement must be a finite number, got True"),
    ("  onnxruntime:\n    fp32: {max_miou_drop_points: .nan}\n",
     "max_miou_drop_points must be a finite number, got nan"),
    ("  onnxruntime:\n    fp32:\n", "backends.onnxruntime.fp32 must map metrics to limits"),
])
def test_thresholds_keys_and_values_are_checked_on_load(tmp_path, entry, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_thresholds(_thresholds(tmp_path, entry))


def test_every_precision_the_harness_reports_is_a_valid_key(tmp_path):
    from lrformer_edge.validation.harness import reportable_precisions

    known = reportable_precisions()
    assert {"int8+bf16", "fp32"} <= set(known["openvino"])
    assert {"fp16+int8", "w8a8"} <= set(known["coreml"])
    lines = "".join(f"  {backend}:\n" + "".join(f"    {p}: {{min_pixel_agreement: 0.9}}\n"
                                               for p in precisions)
                    for backend, precisions in known.items())
    assert set(load_thresholds(_thresholds(tmp_path, lines))["backends"]) == set(known)


def test_an_artifact_without_limits_fails_the_gate(tmp_path):
    thresholds = load_thresholds(_thresholds(
        tmp_path, "  onnxruntime:\n    fp32: {min_pixel_agreement: 0.9999}\n"))
    result = BackendResult("onnxruntime fp16 (m.onnx)", "m.onnx", "onnxruntime", "fp16",
                           pixel_agreement=0.251, miou_delta_points=-84.0)
    found = check([result], thresholds)
    assert len(found) == 1
    assert (f"no limits are defined for backend onnxruntime precision fp16 in "
            f"{tmp_path / 'gate.yaml'}") in str(found[0])
    covered = BackendResult("onnxruntime fp32 (m.onnx)", "m.onnx", "onnxruntime", "fp32",
                            pixel_agreement=1.0, miou_delta_points=0.0)
    assert check([covered], thresholds) == []


def test_a_backend_without_a_thresholds_row_fails_the_gate(tmp_path):
    thresholds = load_thresholds(_thresholds(
        tmp_path, "  onnxruntime:\n    fp32: {min_pixel_agreement: 0.9999}\n"))
    result = BackendResult("tensorrt fp16 (m.engine)", "m.engine", "tensorrt", "fp16",
                           pixel_agreement=1.0, miou_delta_points=0.0)
    found = check([result], thresholds)
    assert [v.metric for v in found] == ["no limits"]
    assert "no limits are defined for backend tensorrt precision fp16" in str(found[0])


def test_backend_options_reach_the_runner_and_bad_ones_stop_before_any_work(artifacts, tmp_path):
    lines = []
    with pytest.raises(ValueError, match="openvino option precision must be one of"):
        run_validation(ValidationConfig([artifacts["onnx"]], tmp_path / "bad", images=IMAGES,
                                        backend_options={"openvino": {"precision": "int4"}},
                                        log=lines.append))
    assert lines == [] and not (tmp_path / "bad").exists()
    if "openvino" not in artifacts:
        pytest.skip("needs OpenVINO (pip install 'lrformer-edge[openvino]')")
    outcome = run_validation(ValidationConfig(
        [artifacts["openvino"], artifacts["onnx"]], tmp_path / "r", images=2,
        backend_options={"openvino": {"precision": "f16"}}, log=lambda *_: None))
    ir, onnx = outcome.run.results[1:]
    assert ir.status == "ok" and ir.precision == "fp32+f16"
    assert ir.settings["requested_precision"] == "f16"
    assert onnx.status == "ok" and onnx.precision == "fp32"  # other backends keep theirs
