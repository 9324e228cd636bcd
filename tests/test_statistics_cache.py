"""The calibration statistics cache (``backends/nncf_statistics.py``): one statistics pass per
model, input size and calibration set, reused by later INT8 exports, and refused, naming what
differs, when it was made for another export."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lrformer_edge.backends.nncf_statistics import (
    StatisticsCache,
    StatisticsCacheMismatch,
    StatisticsKey,
    open_statistics_cache,
)
from lrformer_edge.data.calibration import build_calibration_set

SIZE = (64, 64)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def calibration(tiny_model):
    return build_calibration_set("procedural", tiny_model.config.data, SIZE, 3, seed=0)


def _filled(cache: StatisticsCache) -> StatisticsCache:
    cache.entries["OVStatisticsAggregator-abc"] = {
        "MinMaxTensorStatistic_conv_1_0": {"min_values": np.array(-1.5, np.float32),
                                           "max_values": np.array(2.0, np.float32)}}
    cache.write()
    return cache


def test_a_cache_file_round_trips(tmp_path, tiny_model, calibration):
    key = StatisticsKey.of(tiny_model, SIZE, calibration)
    written = _filled(StatisticsCache(key, tmp_path / "stats.npz"))
    read = StatisticsCache(key, written.path)
    assert read.entries.keys() == written.entries.keys()
    stat = read.entries["OVStatisticsAggregator-abc"]["MinMaxTensorStatistic_conv_1_0"]
    assert float(stat["min_values"]) == -1.5 and float(stat["max_values"]) == 2.0
    assert not list(tmp_path.glob("*.tmp*")), "the write left a temporary file"


@pytest.mark.parametrize("change, named", [
    ("checkpoint", "model weights (checkpoint)"), ("size", "input size"),
    ("calibration", "calibration set")])
def test_a_cache_of_another_export_is_refused_naming_what_differs(tmp_path, tiny_model,
                                                                  calibration, change, named):
    import torch

    import lrformer_edge

    path = _filled(open_statistics_cache(tiny_model, SIZE, calibration, tmp_path / "s.npz")).path
    model, size, calib = tiny_model, SIZE, calibration
    if change == "checkpoint":
        torch.manual_seed(1)
        model = lrformer_edge.create_model("lrformer-test")  # other weights
    elif change == "size":
        size = (64, 96)
    else:
        calib = build_calibration_set("procedural", tiny_model.config.data, SIZE, 3, seed=1)
    with pytest.raises(StatisticsCacheMismatch, match=re.escape(named)) as refused:
        open_statistics_cache(model, size, calib, path)
    assert str(path) in str(refused.value) and "refused" in str(refused.value)
    # By default each export has its own file: the other export starts a new one.
    assert open_statistics_cache(model, size, calib).path != \
        open_statistics_cache(tiny_model, SIZE, calibration).path


def test_a_corrupt_cache_file_is_refused(tmp_path, tiny_model, calibration):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a cache")
    with pytest.raises(StatisticsCacheMismatch, match="unreadable"):
        open_statistics_cache(tiny_model, SIZE, calibration, path)


@pytest.mark.slow
def test_a_second_int8_export_reuses_the_statistics_and_gives_the_same_model(
        tmp_path, tiny_model, calibration, capsys, monkeypatch):
    pytest.importorskip("openvino", reason="needs the openvino extra")
    pytest.importorskip("nncf", reason="needs the openvino extra")
    import openvino as ov

    from lrformer_edge.backends.openvino.export import export_openvino

    cache = tmp_path / "stats.npz"
    first = export_openvino(tiny_model, tmp_path / "a", SIZE, "int8", calibration=calibration,
                            statistics_cache=cache)
    assert "from the shared activation pass (measured now)" in capsys.readouterr().out
    assert cache.is_file()
    second = export_openvino(tiny_model, tmp_path / "b", SIZE, "int8", calibration=calibration,
                             statistics_cache=cache)
    assert re.search(r"calibration statistics: \d+ reused; cache ", capsys.readouterr().out)
    ranges = [_fake_quantize_ranges(ov.Core().read_model(result.path))
              for result in (first, second)]
    assert ranges[0] and len(ranges[0]) == len(ranges[1])
    for index, (mine, theirs) in enumerate(zip(*ranges)):
        np.testing.assert_array_equal(mine, theirs, err_msg=f"FakeQuantize #{index}")

    # SmoothQuant's per-channel maxima cannot be stored and the ranges after it depend on which
    # layers it scaled, so such an export neither reads nor writes the cache, even where the
    # default cache holds this export's statistics (a file named for it is refused: below).
    from lrformer_edge.backends.nncf_statistics import StatisticsKey
    from lrformer_edge.files import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "default"))
    default = tmp_path / "default" / "statistics" / \
        StatisticsKey.of(tiny_model, SIZE, calibration).file_name()
    default.parent.mkdir(parents=True)
    default.write_bytes(cache.read_bytes())
    before = default.stat()
    smoothed = export_openvino(tiny_model, tmp_path / "smoothed", SIZE, "int8",
                               calibration=calibration, smooth_quant=0.5)
    assert "calibration statistics" not in capsys.readouterr().out
    after = default.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert smoothed.metadata["quantization"]["smooth_quant"] == {"convolution": 0.5}
    assert first.metadata["quantization"]["smooth_quant"] is False
    assert "nncf_smooth_quant" in smoothed.path.read_text()
    assert "nncf_smooth_quant" not in first.path.read_text()


def test_smooth_quant_alpha_outside_its_range_is_refused(tmp_path, tiny_model):
    pytest.importorskip("openvino", reason="needs the openvino extra")
    from lrformer_edge.backends.openvino.export import export_openvino
    from lrformer_edge.backends.openvino.ptq import check_smooth_quant

    with pytest.raises(ValueError, match="SmoothQuant applies to int8 only, not to fp32"):
        export_openvino(tiny_model, tmp_path / "y", SIZE, "fp32", smooth_quant=0.5)
    assert not (tmp_path / "y").exists()

    for alpha in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
            check_smooth_quant(alpha)
    check_smooth_quant(None)
    check_smooth_quant(0.5)
    done = subprocess.run([sys.executable, str(REPO / "export_scripts/to_openvino.py"),
                           "--precision", "fp32", "--smooth-quant", "0.5", "--output",
                           str(tmp_path / "x")], capture_output=True, text=True)
    assert done.returncode == 2 and "--smooth-quant applies to --precision int8" in done.stderr
    assert not (tmp_path / "x").exists()
    # A cache file named for a SmoothQuant export would be ignored: refused instead.
    named = subprocess.run([sys.executable, str(REPO / "export_scripts/to_openvino.py"),
                            "--precision", "int8", "--smooth-quant", "0.5", "--statistics-cache",
                            str(tmp_path / "s.npz"), "--output", str(tmp_path / "x")],
                           capture_output=True, text=True)
    assert named.returncode == 2 and "leave out --statistics-cache" in named.stderr
    assert "Traceback" not in named.stderr and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="cannot serve a SmoothQuant export"):
        export_openvino(tiny_model, tmp_path / "z", SIZE, "int8", calibration=object(),
                        statistics_cache=tmp_path / "s.npz", smooth_quant=0.5)
    assert not (tmp_path / "z").exists() and not (tmp_path / "s.npz").exists()


def _fake_quantize_ranges(ov_model) -> list[np.ndarray]:
    """Input ranges of the FakeQuantize nodes in topological order (generated node names
    differ from one export to the next)."""
    ranges = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        limits = [op.input_value(i).get_node() for i in (1, 2)]
        if all(limit.get_type_name() == "Constant" for limit in limits):
            ranges.append(np.concatenate([limit.get_data().ravel() for limit in limits]))
    return ranges


def test_procedural_calibration_scenes_are_generated_once(tiny_model, statistics_cache_dir):
    first = build_calibration_set("procedural", tiny_model.config.data, SIZE, 2, seed=7)
    files = list((statistics_cache_dir / "calibration").glob("procedural-2-7-*.npz"))
    assert len(files) == 1
    again = build_calibration_set("procedural", tiny_model.config.data, SIZE, 2, seed=7)
    assert again.sha256 == first.sha256 and again.names == first.names
    files[0].write_bytes(b"damaged")  # an unreadable file is regenerated, not trusted
    rebuilt = build_calibration_set("procedural", tiny_model.config.data, SIZE, 2, seed=7)
    assert rebuilt.sha256 == first.sha256
    assert np.load(files[0])["images"].shape[0] == 2
