"""The benchmark reads its rows from the backend registry: each backend's ``benchmark_candidates``.

The measured benchmark over the real backends (OpenVINO and the rest) is in test_openvino.py."""
from __future__ import annotations

from dataclasses import replace

import pytest

from lrformer_edge import backends
from lrformer_edge.artifacts.optional import MissingDependencyError
from lrformer_edge.backends import get_backend
from lrformer_edge.backends.base import BenchmarkContext, Candidate
from lrformer_edge.backends.openvino.benchmark import _runs, int8_row_name
from lrformer_edge.backends.pytorch.runner import TorchRunner
from lrformer_edge.benchmark import markdown_table, run_benchmark
from lrformer_edge.cpu import DEFAULT_INT8_TARGET
from lrformer_edge.models.checkpoint import save_mmseg_checkpoint

MISSING = "the fake SDK needs the Python package 'fakesdk', which is not installed"


def fake_backend(name: str, candidates):
    """A registry record like PyTorch's, whose benchmark rows are ``candidates(context)``."""
    return replace(get_backend("pytorch"), name=name, title=f"{name} format",
                   benchmark_candidates=candidates)


def test_the_rows_come_from_the_registry(tiny_model, tmp_path, monkeypatch):
    seen = []

    def eager_and_checkpoint(context: BenchmarkContext) -> list[Candidate]:
        seen.append(context)
        checkpoint = save_mmseg_checkpoint(context.model.state_dict(),
                                           context.work_dir / "tiny.pth",
                                           meta={"variant": "lrformer-test"})
        return [Candidate("eager", "fake", "fp32",
                          lambda: TorchRunner(context.model, input_size=context.input_size)),
                # an artifact opened by the registry's backend for it (here PyTorch's)
                Candidate("checkpoint", "fake", "fp32",
                          lambda: context.open_runner(checkpoint, input_size=context.input_size),
                          checkpoint)]

    def sdk_missing(context: BenchmarkContext) -> list[Candidate]:
        raise MissingDependencyError(MISSING)

    registry = (fake_backend("fake", eager_and_checkpoint), fake_backend("absent", sdk_missing),
                replace(get_backend("pytorch"), name="silent", benchmark_candidates=None))
    monkeypatch.setattr(backends, "BACKENDS", registry)
    rows = run_benchmark(tiny_model, (64, 64), tmp_path, eval_images=1, iterations=2, warmup=1,
                         log=lambda *_: None, int8_targets=("auto", DEFAULT_INT8_TARGET))

    assert [(r.format, r.backend, r.precision) for r in rows] == [
        ("eager", "fake", "fp32"), ("checkpoint", "fake", "fp32"),
        ("absent format", "absent", "all")]
    context, = seen
    assert context.input_size == (64, 64) and context.work_dir == tmp_path
    assert not context.all_formats and DEFAULT_INT8_TARGET in context.int8_targets
    assert "auto" not in context.int8_targets  # resolved to this CPU's target
    for row in rows[:2]:
        assert row.status == "ok" and row.median_ms > 0 and row.fps > 0
        assert row.agreement_vs_pytorch == 1.0 and 0 <= row.miou <= 1
    assert rows[0].speedup_vs_pytorch == 1.0 and rows[0].size_mib is None
    assert rows[1].size_mib > 0
    # A backend whose SDK is missing is a skipped row naming what is missing, not a crash.
    assert rows[2].status == f"skipped: {MISSING}" and rows[2].median_ms is None
    assert "| absent format | absent | all | skipped: the fake SDK needs" in markdown_table(
        rows, "title")


def test_the_calibration_set_is_built_once_and_only_when_asked(tiny_model, tmp_path,
                                                               monkeypatch):
    sets = []

    def calibrated(context: BenchmarkContext) -> list[Candidate]:
        sets.extend([context.calibration(), context.calibration()])
        return [Candidate("eager", "fake", "fp32",
                          lambda: TorchRunner(context.model, input_size=context.input_size))]

    monkeypatch.setattr(backends, "BACKENDS", (fake_backend("fake", calibrated),))
    logged = []
    run_benchmark(tiny_model, (64, 64), tmp_path, eval_images=1, iterations=1, warmup=0,
                  calibration_images=2, log=logged.append)
    assert sets[0] is sets[1] and len(sets[0].batches) == 2
    assert sum("calibration set" in line for line in logged) == 1


@pytest.mark.parametrize("all_formats, targets, expected", [
    (False, (DEFAULT_INT8_TARGET,), ["fp32", "bf16", "int8", "int8+bf16"]),
    (True, (DEFAULT_INT8_TARGET, "vnni"),
     ["fp32", "bf16", "fp16", "int8", "int8+bf16", "int8-vnni", "int8-vnni+bf16"]),
])
def test_openvino_rows(all_formats, targets, expected, tmp_path):
    context = BenchmarkContext(None, (64, 64), tmp_path, lambda: None, None, all_formats,
                               targets, open_runner=None)
    assert [name for name, _, _ in _runs(context)] == expected
    assert int8_row_name(DEFAULT_INT8_TARGET) == "int8" and int8_row_name("vnni") == "int8-vnni"
