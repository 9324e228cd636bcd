"""Progress of long steps (``lrformer_edge.progress``): plain lines when stderr is not a terminal,
a live line when it is, silence when switched off; and a real command, piped, reporting its steps
(issue 19: no step silent for more than 10 s)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lrformer_edge import progress
from lrformer_edge.progress import duration, heartbeat, track

REPO = Path(__file__).resolve().parents[1]
INTERVAL = 0.05  # seconds between progress lines in these tests
ETA_LINE = re.compile(r"^(?P<label>.+): (?P<done>\d+)/(?P<total>\d+) (?P<what>\w+), "
                      r"[\d.]+ s(?P<eta>, ETA \d+ s)?$")


@pytest.fixture(autouse=True)
def plain_lines(monkeypatch):
    """Line mode every INTERVAL seconds, whatever the environment of the test run says."""
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", INTERVAL)
    monkeypatch.delenv("LRFORMER_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def progress_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("progress: ")]


def slow(items, seconds: float):
    for item in items:
        time.sleep(seconds)
        yield item


def test_track_yields_every_item_and_reports_counts_eta_and_total_time(capsys):
    items = list(track(slow(range(6), 2 * INTERVAL), total=6, what="images", label="calibration"))
    assert items == list(range(6))
    lines = capsys.readouterr().err.splitlines()
    under_way = [ETA_LINE.match(line) for line in lines[:-1]]
    assert all(under_way), lines  # every line before the last: count, elapsed, ETA
    assert all(m["eta"] for m in under_way if m["done"] != "0")  # (none before the first item)
    assert {m["label"] for m in under_way} == {"calibration"}
    assert {m["what"] for m in under_way} == {"images"}
    assert {m["total"] for m in under_way} == {"6"}
    counts = [int(m["done"]) for m in under_way]
    assert counts == sorted(counts) and len(set(counts)) > 2  # it moves
    assert re.fullmatch(r"calibration: 6/6 images in [\d.]+ s", lines[-1])
    assert progress_threads() == []


def test_track_takes_the_length_of_sized_iterables_and_counts_generators_without_one(capsys):
    list(track([0.5] * 3, label="sized"))
    sized = capsys.readouterr().err.splitlines()
    assert sized[0].startswith("sized: 1/3 items") and sized[-1].startswith("sized: 3/3 items in")
    list(track(slow(range(3), 2 * INTERVAL), what="scenes", label="open-ended"))
    lines = capsys.readouterr().err.splitlines()
    assert all(re.fullmatch(r"open-ended: \d scenes, [\d.]+ s", line) for line in lines[:-1])
    assert re.fullmatch(r"open-ended: 3 scenes in [\d.]+ s", lines[-1])


def test_a_slow_item_is_reported_while_it_runs(capsys):
    for _ in track(range(1), label="one long item"):
        time.sleep(8 * INTERVAL)
        during = capsys.readouterr().err.splitlines()
    assert len(during) >= 3 and all(line.startswith("one long item: 0/1 items") for line in during)


def test_heartbeat_reports_a_step_that_cannot_count(capsys):
    with heartbeat("ONNX export"):
        time.sleep(6 * INTERVAL)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3
    assert all(re.fullmatch(r"ONNX export: still running, \d+ s", line) for line in lines[:-1])
    assert re.fullmatch(r"ONNX export: done in [\d.]+ s", lines[-1])
    assert progress_threads() == []


def test_heartbeat_passes_exceptions_on_and_stops(capsys):
    with pytest.raises(KeyError, match="boom"):
        with heartbeat("lowering"):
            time.sleep(4 * INTERVAL)
            raise KeyError("boom")
    assert capsys.readouterr().err.splitlines()[-1].startswith("lowering: failed after ")
    assert progress_threads() == []
    time.sleep(3 * INTERVAL)
    assert capsys.readouterr().err == ""  # nothing after the end


def test_a_loop_left_early_says_where_it_stopped(capsys):
    with pytest.raises(RuntimeError):
        for index in track(slow(range(10), 2 * INTERVAL), total=10, label="validation"):
            if index == 3:
                raise RuntimeError("artifact failed")
    assert capsys.readouterr().err.splitlines()[-1].startswith("validation: stopped at 3/10 ")
    for index in track(slow(range(10), 2 * INTERVAL), total=10, label="search"):
        if index == 2:
            break
    assert capsys.readouterr().err.splitlines()[-1].startswith("search: stopped at 2/10 ")
    assert progress_threads() == []


def test_a_step_failing_at_once_leaves_its_error_alone(capsys):
    """Bad input gets one line, the error's: no progress lines around it."""
    def unreadable():
        raise ValueError("calibration source x does not exist")
        yield

    with pytest.raises(ValueError):
        list(track(unreadable(), total=300, label="calibration set"))
    with pytest.raises(ValueError):
        with heartbeat("export"):
            raise ValueError("bad size")
    assert capsys.readouterr().err == ""
    assert progress_threads() == []


def test_nested_steps_report_each_other(capsys):
    for index in track(range(3), label="outer"):
        if index == 1:
            with heartbeat("inner"):
                time.sleep(4 * INTERVAL)
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("inner: still running") for line in lines)
    assert any(line.startswith("outer: 1/3 items") for line in lines)
    assert any(line.startswith("inner: done in") for line in lines)
    assert lines[-1].startswith("outer: 3/3 items in")
    assert progress_threads() == []


@pytest.mark.parametrize("variable, value", [("LRFORMER_PROGRESS", "0"),
                                             ("LRFORMER_PROGRESS", "off"),
                                             ("RANK", "1")])  # torchrun: rank 0 speaks
def test_switched_off_it_is_silent(capsys, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert list(track(slow(range(3), 2 * INTERVAL), total=3, label="quiet")) == [0, 1, 2]
    with heartbeat("quiet"):
        time.sleep(3 * INTERVAL)
    assert capsys.readouterr().err == ""


def test_the_interval_comes_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "0.5")
    assert progress._interval_from_environment() == 0.5
    for bad in ("soon", "0", "-1", "inf"):
        monkeypatch.setenv(progress.INTERVAL_VARIABLE, bad)
        assert progress._interval_from_environment() == progress.DEFAULT_INTERVAL_S
        assert f"{progress.INTERVAL_VARIABLE}={bad!r} is not a positive number" in \
            capsys.readouterr().err


def test_on_a_terminal_one_live_line_is_redrawn(capsys, monkeypatch):
    monkeypatch.setattr(progress, "_on_terminal", lambda: True)
    monkeypatch.setattr(progress, "_REDRAW_S", INTERVAL / 2)
    for _ in track(slow(range(4), 2 * INTERVAL), total=4, what="images", label="calibration"):
        pass
    err = capsys.readouterr().err
    live, _, last = err.rpartition("\x1b[K")
    assert "\n" not in live  # redrawn in place, no line per update
    assert "\rcalibration: [#####...............] 1/4 images" in live and "ETA" in live
    assert re.fullmatch(r"calibration: 4/4 images in [\d.]+ s\n", last)


def test_durations_read_as_a_person_would_say_them():
    assert duration(18.34) == "18.3 s" and duration(79.4, 0) == "79 s"
    assert duration(245) == "4 min 05 s" and duration(3725) == "1 h 02 min"


@pytest.mark.slow  # 12 s on an idle 2-core machine, 26 s on a loaded one
def test_a_piped_export_reports_every_step_with_an_eta(tmp_path):
    """The issue's acceptance: a real command with its output piped (as in CI or under nohup)
    shows progress lines with an ETA on stderr, and no gap between them exceeds 10 s."""
    command = [sys.executable, str(REPO / "export_scripts/to_onnx.py"), "--variant",
               "lrformer-test", "--input-size", "64", "64", "--validate", "8",
               "--output", str(tmp_path / "tiny.onnx")]
    env = {**os.environ, "LRFORMER_PROGRESS_INTERVAL": "1"}
    env.pop("LRFORMER_PROGRESS", None)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path, env=env)
    stderr: list[tuple[float, str]] = []

    def read_stderr():
        for line in process.stderr:
            stderr.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    stdout = process.stdout.read()
    assert process.wait(timeout=600) == 0, stdout + "\n".join(line for _, line in stderr)
    reader.join(timeout=60)
    lines = [line for _, line in stderr]
    assert "pixel agreement" in stdout and not any(line in stdout for line in lines)
    for step in ("ONNX export of tiny.onnx", "parity check of tiny.onnx",
                 "generating held-out scenes", "FP32 PyTorch ground truth",
                 "ONNX model tiny.onnx"):
        assert any(line.startswith(step + ": ") for line in lines), (step, lines)
    with_eta = [m for m in map(ETA_LINE.match, lines) if m and m["eta"]]
    assert {m["label"] for m in with_eta} >= {"FP32 PyTorch ground truth", "ONNX model tiny.onnx"}
    assert any(re.fullmatch(r"FP32 PyTorch ground truth: 8/8 images in [\d.]+ s", line)
               for line in lines)
    times = [t for t, _ in stderr]
    assert max(b - a for a, b in zip(times, times[1:])) <= 10, stderr
