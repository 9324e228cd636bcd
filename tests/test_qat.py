"""Quantization-aware training with NNCF: init from PTQ, distillation, resume, DDP, exports."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import lrformer_edge
from lrformer_edge.backends.tensorrt.export import tensorrt_problems
from lrformer_edge.data.calibration import build_calibration_set, stratified_choice
from lrformer_edge.data.procedural import write_ade20k_layout

pytest.importorskip("nncf")

from lrformer_edge.quant.qat import (  # noqa: E402
    ALL_TARGETS,
    QAT_TARGETS,
    QATConfig,
    distillation_loss,
    export_feed,
    qat_artifacts,
    qat_backends,
    quantizer_parameters,
    quantizer_rules,
    restore,
    train_qat,
    weight_target_isa,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = (128, 128)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat-data")
    return write_ade20k_layout(root, {"training": range(6), "validation": range(1000, 1002)},
                               size=SIZE)


def _config(dataset, work_dir, **overrides):
    values = dict(data=str(dataset), work_dir=str(work_dir), input_size=SIZE, iters=2,
                  batch_size=1, val_interval=2, val_images=2, calib_images=3, log_interval=1)
    values.update(overrides)
    return QATConfig(**values)


def test_distillation_loss_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(1, 5, 4, 4)
    assert distillation_loss(logits, logits, 2.0).abs() < 1e-6
    assert distillation_loss(logits, torch.randn(1, 5, 4, 4), 2.0) > 0.01


def test_stratified_sampling_covers_every_group():
    rng = np.random.default_rng(0)
    groups = {"a": list(range(10)), "b": list(range(100, 103)), "c": list(range(200, 250))}
    chosen = stratified_choice(groups, 6, rng)
    assert len(chosen) == 6 and {c // 100 for c in chosen} == {0, 1, 2}
    again = stratified_choice(groups, 6, np.random.default_rng(0))
    assert again == chosen  # seeded


def test_calibration_from_a_video_file(tmp_path):
    from lrformer_edge.data.procedural import write_procedural_video
    from lrformer_edge.registry import BUNDLED_MODEL, get_config

    video = tmp_path / "drive.avi"
    write_procedural_video(video, 12, 96, 128)
    data = get_config(BUNDLED_MODEL).data
    calibration = build_calibration_set(str(video), data, SIZE, count=4, seed=1)
    assert len(calibration.batches) == 4 and calibration.batches[0].shape == (1, 3, *SIZE)
    frames = [int(name.split("frame")[1]) for name in calibration.names]
    assert frames == sorted(frames) and frames[0] < 3 and frames[-1] >= 9  # spread over time
    assert build_calibration_set(str(video), data, SIZE, 4, 1).sha256 == calibration.sha256


@pytest.mark.slow
@pytest.mark.timeout(1800)  # trains, then exports to the OpenVINO and TensorRT QAT targets
def test_qat_trains_restores_and_exports_to_every_target(dataset, tmp_path):
    """The bundled LRFormer-T (its exports must agree with PyTorch); resuming is checked on the
    tiny variant (test_qat_resumes_where_it_stopped)."""
    work = tmp_path / "qat"
    # With the label loss too (the default is distillation only).
    summary = train_qat(_config(dataset, work, task_weight=1.0), log=lambda *_: None)
    assert {"fp32_mIoU", "ptq_mIoU", "best", "history"} <= set(summary)
    assert (work / "best.pth").is_file() and (work / "latest.pth").is_file()

    model, payload = restore(work / "latest.pth")
    assert payload["iteration"] == 2 and payload["target"] == "all"
    # BatchNorm statistics stay those of the FP32 model (batches of 1-2 would only add noise).
    teacher = lrformer_edge.create_model(payload["variant"])
    statistics = [m.running_mean for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    trained = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(trained) == len(statistics) > 0
    assert all(torch.equal(a, b) for a, b in zip(trained, statistics))
    feed = build_calibration_set("procedural", model.config.data, SIZE, 1, seed=5).batches[0]
    with torch.no_grad():
        first = model(torch.from_numpy(feed))
        second, _ = restore(work / "latest.pth")
        assert torch.equal(first, second(torch.from_numpy(feed)))

    # Through the registry, as calibration/qat.py exports: each backend's own exporter. The
    # ExecuTorch export of a QAT model (about 2 min of lowering for LRFormer-T) has its own test,
    # tests/test_executorch_qat.py, on the tiny variant.
    quantized, saved = restore(work / "best.pth")
    feed = export_feed(quantized, saved)
    exported = {backend.name: backend.export_qat(quantized, saved, path, feed)
                for backend, path in qat_artifacts(work, ALL_TARGETS, saved["variant"])
                if backend.name != "executorch"}
    assert set(exported) | {"executorch"} == {b.name for b in qat_backends(ALL_TARGETS)}
    ir, qdq = exported["openvino"], exported["tensorrt"]
    assert ir.path == work / "openvino-int8" / f"{payload['variant']}-qat.xml"
    assert qdq.path == work / "lrformer-qat-int8.onnx"
    assert ir.parity.pixel_agreement >= 0.99
    assert ir.metadata["weights_precision"] == "int8"
    # One model for every target: portable 7-bit weights (OpenVINO is among the targets), and
    # both artifacts say so.
    for result in (ir, qdq):
        assert result.metadata["quantization"]["target"] == ALL_TARGETS
        assert result.metadata["quantization"]["weight_bits"] == 7
        assert result.metadata["calibration_set"]["images"] == 3
    import openvino as ov

    ops = {op.get_type_name() for op in ov.Core().read_model(str(ir.path)).get_ops()}
    assert "FakeQuantize" in ops
    from lrformer_edge.backends.openvino.ptq import pooling_matmuls

    assert pooling_matmuls(ov.Core().read_model(str(ir.path)))  # pooling stays float in QAT too

    assert qdq.parity.pixel_agreement >= 0.99
    assert qdq.metadata["quantization"]["activation_quantizers"] > 0
    graph = onnx.load(str(qdq.path))
    assert tensorrt_problems(graph) == []
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) > 50
    assert qdq.metadata["target"] == "tensorrt" and qdq.metadata["precision"] == "int8"


@pytest.mark.slow
def test_qat_resumes_where_it_stopped(dataset, tmp_path):
    """Resume and restore do not depend on the network's width: the tiny variant."""
    work = tmp_path / "qat"
    summary = train_qat(_config(dataset, work, variant="lrformer-test"), log=lambda *_: None)
    resumed = train_qat(_config(dataset, work, variant="lrformer-test", iters=3, resume=True),
                        log=lambda *_: None)
    assert [h["iter"] for h in resumed["history"]] == [3]  # continued after iteration 2
    model, payload = restore(work / "latest.pth")
    assert payload["iteration"] == 3 and payload["variant"] == "lrformer-test"
    # The PTQ figure survives a resume, so the run after the next resume still compares with it.
    assert payload["config"]["extra"]["ptq"]["mIoU"] == summary["ptq_mIoU"] == resumed["ptq_mIoU"]
    feed = torch.from_numpy(export_feed(model, payload))
    with torch.no_grad():
        assert torch.equal(model(feed), restore(work / "latest.pth")[0](feed))


def test_restore_rejects_other_files(tmp_path):
    other = tmp_path / "plain.pth"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a QAT checkpoint"):
        restore(other)
    with pytest.raises(ValueError, match="does not exist"):
        restore(tmp_path / "missing.pth")
    older = tmp_path / "older.pth"
    torch.save({"format": "lrformer-edge-qat/1", "state_dict": {}}, older)
    with pytest.raises(ValueError, match="written by an older version .* run calibration/qat.py"):
        restore(older)


def test_qat_targets_are_the_registered_backends_that_export_qat():
    from lrformer_edge.backends import BACKENDS

    exporting = tuple(backend.name for backend in BACKENDS if backend.export_qat)
    assert {"openvino", "tensorrt"} <= set(exporting)
    assert QAT_TARGETS == exporting + (ALL_TARGETS,)
    assert [backend.name for backend in qat_backends(ALL_TARGETS)] == list(exporting)
    assert all(backend.qat_artifact_name for backend in qat_backends(ALL_TARGETS))
    with pytest.raises(ValueError, match="target must be one of"):
        qat_backends("coreml")  # registered, but exports no QAT model


def test_qat_weights_keep_8_bits_only_when_every_target_sums_int8_exactly():
    from dataclasses import replace

    from lrformer_edge.backends import get_backend
    from lrformer_edge.cpu import int8_needs_exact_accumulation

    gpu, cpu = get_backend("tensorrt"), get_backend("openvino")
    assert gpu.exact_int8_accumulation and not cpu.exact_int8_accumulation
    npu = replace(gpu, name="npu")  # decided by the record's field, not by a name
    for targets in ((gpu,), (npu,), (gpu, npu)):
        assert int8_needs_exact_accumulation(weight_target_isa(targets, "portable"))
    assert weight_target_isa((cpu,), None) == "portable"
    assert weight_target_isa((gpu, cpu), None) == "portable"  # one model for both: 7 bits
    assert weight_target_isa((gpu, cpu), "amx") == "amx"


def test_quantizer_rules_come_from_the_target_backends():
    from dataclasses import replace

    import nncf

    from lrformer_edge.backends import get_backend

    gpu, cpu = get_backend("tensorrt"), get_backend("openvino")
    assert quantizer_rules(nncf, (cpu,)) == {}
    per_tensor = quantizer_rules(nncf, (gpu,))
    assert per_tensor["activations_quantization_params"].per_channel is False
    assert quantizer_rules(nncf, (cpu, gpu)) == per_tensor  # OpenVINO runs TensorRT's rules
    per_channel = replace(cpu, quantizer_rules=lambda nncf: {
        "activations_quantization_params":
            nncf.quantization.advanced_parameters.QuantizationParameters(per_channel=True)})
    with pytest.raises(ValueError, match="one QAT model per target"):
        quantizer_rules(nncf, (per_channel, gpu))
    # What nncf.quantize gets for each target.
    expected = {"openvino": (nncf.OverflowFix.ENABLE, None),
                "tensorrt": (nncf.OverflowFix.DISABLE, False),
                ALL_TARGETS: (nncf.OverflowFix.ENABLE, False)}
    for target, (fix, activations_per_channel) in expected.items():
        advanced = quantizer_parameters(target)["advanced_parameters"]
        assert advanced.overflow_fix == fix
        assert getattr(advanced.activations_quantization_params, "per_channel",
                       None) == activations_per_channel


def test_openvino_parity_check_emulates_exact_int8_only_where_the_host_saturates(monkeypatch):
    from lrformer_edge import cpu
    from lrformer_edge.backends.openvino.export import parity_emulates_exact_int8

    def int8_ir(target):
        return {"weights_precision": "int8",
                "quantization": {"target_cpu_isa": target} if target else {}}

    monkeypatch.setattr(cpu, "host_cpu", lambda: cpu.CpuInfo("AVX2 only", "x86_64", avx2=True))
    assert parity_emulates_exact_int8(int8_ir("vnni"))
    assert parity_emulates_exact_int8(int8_ir(None))  # NNCF's default: full-range weights
    assert not parity_emulates_exact_int8(int8_ir("portable"))
    assert not parity_emulates_exact_int8({"weights_precision": "fp32"})
    monkeypatch.setattr(cpu, "host_cpu",
                        lambda: cpu.CpuInfo("VNNI", "x86_64", avx2=True, vnni=True))
    assert not parity_emulates_exact_int8(int8_ir("vnni"))


def test_qat_defaults_are_the_qat_calibration_count_and_the_native_size(dataset, tmp_path):
    from lrformer_edge.data.calibration import QAT_CALIBRATION_IMAGES
    from lrformer_edge.quant.qat import _setup
    from lrformer_edge.registry import get_config

    config = QATConfig(data=str(dataset), work_dir=str(tmp_path / "qat"), variant="lrformer-test")
    assert config.calib_images == QAT_CALIBRATION_IMAGES
    run = _setup(config, log=lambda *_: None)
    assert run.size == tuple(get_config("lrformer-test").data.native_size)


@pytest.mark.parametrize("target", [t for t in QAT_TARGETS if t != ALL_TARGETS])
def test_qat_cli_refuses_an_unwritable_export_before_training(dataset, tmp_path, target):
    from lrformer_edge.quant.qat import qat_artifacts

    output = tmp_path / "qat"
    [(_, artifact)] = qat_artifacts(output, target, "lrformer-t.procedural")
    artifact.mkdir(parents=True)  # someone else's folder where the export would go
    (artifact / "mine.txt").write_text("keep")
    done = subprocess.run(
        [sys.executable, str(REPO / "calibration/qat.py"), "--data", str(dataset), "--output",
         str(output), "--target", target], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert artifact.name in done.stderr
    assert [p.name for p in output.iterdir()] == [artifact.name]  # no training started
    assert (artifact / "mine.txt").read_text() == "keep"


@pytest.mark.slow
def test_qat_ddp_with_two_cpu_processes_and_tensorrt_export(dataset, tmp_path):
    work = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", "29531", str(REPO / "calibration/qat.py"), "--data", str(dataset),
         "--output", str(work), "--input-size", *map(str, SIZE), "--iters", "2",
         "--batch-size", "1", "--val-interval", "2", "--val-images", "2", "--calib-images", "3",
         "--threads", "1", "--target", "tensorrt"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    assert (work / "lrformer-qat-int8.onnx").is_file() and (work / "best.pth").is_file()
    engine = tmp_path / "qat.engine"
    trt = subprocess.run(
        [sys.executable, str(REPO / "export_scripts/to_tensorrt.py"), "--int8",
         "--qat-checkpoint", str(work / "best.pth"), "--onnx-only", "--output", str(engine)],
        capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert trt.returncode == 0, trt.stderr[-3000:]
    assert "QAT" in trt.stdout and (tmp_path / "qat.onnx").is_file()
    assert tensorrt_problems(onnx.load(str(tmp_path / "qat.onnx"))) == []
