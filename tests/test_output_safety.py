"""An output path never destroys what is not ours, and a bad one is refused before any work.

Tests run as root here, where chmod does not stop writes: an unwritable location is simulated
by making ``os.access`` (what the checks consult) say no, and the real chmod test runs only for
other users. "A file in the way" (an output under a regular file) is real for everyone.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lrformer_edge.artifacts import staging as files
from lrformer_edge.artifacts.staging import (
    ARTIFACT_MARKER,
    check_output_folder,
    check_replaceable_folder,
    foreign_files,
    staged_directory,
)
from lrformer_edge.files import atomic_write, check_output_file

REPO = Path(__file__).resolve().parents[1]
TINY = ("--variant", "lrformer-test", "--input-size", "64", "64")


def run(script: str, *args, cwd=REPO, timeout=600):
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def user_folder(path: Path) -> Path:
    """A folder of the user's own files (the reproduction of the bug report)."""
    path.mkdir()
    (path / "notes.txt").write_text("n\n")
    (path / "other.onnx").write_text("x\n")
    return path


def previous_artifact(path: Path) -> Path:
    with staged_directory(path) as staging:
        (staging / "old.xml").write_text("<net/>")
    return path


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def assert_refused(result, *facts):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fact in facts:
        assert fact in lines[0], lines[0]


# ------------------------------------------------------------------ library: replaceable folders

def test_a_missing_or_empty_folder_may_be_replaced(tmp_path):
    assert check_replaceable_folder(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_replaceable_folder(tmp_path / "empty")


def test_a_folder_of_user_files_is_refused_naming_them(tmp_path):
    folder = user_folder(tmp_path / "models-out")
    with pytest.raises(ValueError) as error:
        check_replaceable_folder(folder, "--output")
    message = str(error.value)
    assert message.startswith(f"--output {folder} holds files that are not an lrformer-edge")
    assert "notes.txt" in message and "other.onnx" in message
    assert "choose a new or empty folder" in message


def test_staged_directory_marks_what_it_wrote_and_replaces_only_that(tmp_path):
    target = previous_artifact(tmp_path / "ir")
    marker = json.loads((target / ARTIFACT_MARKER).read_text())
    assert marker["files"] == ["old.xml"]
    with staged_directory(target) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "new.bin").write_bytes(b"1")
    assert sorted(p.name for p in target.rglob("*")) == [ARTIFACT_MARKER, "new.bin", "sub"]
    assert sorted(os.listdir(tmp_path)) == ["ir"]  # no staging folder or backup left behind


def test_a_user_file_added_to_a_previous_artifact_protects_it(tmp_path):
    target = previous_artifact(tmp_path / "ir")
    (target / "my-notes.txt").write_text("keep me")
    assert foreign_files(target) == ["my-notes.txt"]
    with pytest.raises(ValueError, match="my-notes.txt"):
        check_replaceable_folder(target)


@pytest.mark.parametrize("marker", ["not json", '["a list"]', '{"files": "old.xml"}'])
def test_an_unreadable_marker_is_not_trusted(tmp_path, marker):
    target = tmp_path / "ir"
    target.mkdir()
    (target / ARTIFACT_MARKER).write_text(marker)
    (target / "old.xml").write_text("<net/>")
    with pytest.raises(ValueError, match="not an lrformer-edge artifact"):
        check_replaceable_folder(target)


def test_ir_and_package_written_before_the_marker_are_recognised_by_their_metadata(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder, rt_info in ((ours, "<lrformer_edge><keys value='[]'/></lrformer_edge>"),
                            (theirs, "<other/>")):
        folder.mkdir()
        (folder / "m.xml").write_text(f"<net><rt_info>{rt_info}</rt_info></net>")
        (folder / "m.bin").write_bytes(b"\0")
    check_replaceable_folder(ours)
    with pytest.raises(ValueError, match="m.bin, m.xml"):
        check_replaceable_folder(theirs)
    package = tmp_path / "old.mlpackage"
    (package / "Data" / "com.apple.CoreML").mkdir(parents=True)
    (package / "Manifest.json").write_text("{}")
    (package / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(
        b"\x08\x09lrformer_edge.variant")
    check_replaceable_folder(package)
    (package / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="mine.txt"):
        check_replaceable_folder(package)


def test_the_current_folder_and_its_parents_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for path in (".", "..", str(work), "/"):
        with pytest.raises(ValueError, match="is the current folder or contains it"):
            check_replaceable_folder(path, "--output")


def test_a_regular_file_or_a_symbolic_link_is_not_replaced(tmp_path):
    (tmp_path / "file").write_text("data")
    with pytest.raises(ValueError, match="is an existing file, not a folder"):
        check_replaceable_folder(tmp_path / "file")
    (tmp_path / "link").symlink_to(previous_artifact(tmp_path / "real"))
    with pytest.raises(ValueError, match="symbolic link"):
        check_replaceable_folder(tmp_path / "link")


# ------------------------------------------------------------------ library: staged_directory

def test_staged_directory_refuses_before_the_work_and_touches_nothing(tmp_path):
    folder = user_folder(tmp_path / "models-out")
    (tmp_path / "file").write_text("data")
    before = snapshot(tmp_path)
    for target in (folder, tmp_path / "file"):
        with pytest.raises(ValueError):
            with staged_directory(target):
                pytest.fail("the work must not start")
    assert snapshot(tmp_path) == before  # no staging folder, no .NAME.old-PID


def test_a_folder_filled_by_the_user_during_the_work_is_not_replaced(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="late.txt"):
        with staged_directory(target) as staging:
            (staging / "model.xml").write_text("<net/>")
            target.mkdir()
            (target / "late.txt").write_text("arrived while exporting")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert os.listdir(target) == ["late.txt"]


def test_a_failed_export_leaves_the_previous_artifact(tmp_path):
    target = previous_artifact(tmp_path / "ir")
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staging:
            (staging / "half.xml").write_text("<ne")
            raise RuntimeError("conversion failed")
    assert sorted(os.listdir(target)) == [ARTIFACT_MARKER, "old.xml"]
    assert sorted(os.listdir(tmp_path)) == ["ir"]


# ------------------------------------------------------------------ library: files and folders

def test_output_file_checks(tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    (tmp_path / "blocker").write_text("data")
    check_output_file(tmp_path / "new" / "deeper" / "m.onnx")
    with pytest.raises(ValueError, match="is an existing folder, not a file"):
        check_output_file(tmp_path / "dir.onnx", "--output")
    with pytest.raises(ValueError, match=r"blocker is not a folder \(a file is in the way\)"):
        check_output_file(tmp_path / "blocker" / "m.onnx")
    with pytest.raises(ValueError, match="is an existing folder"):  # the writer's last guard
        atomic_write(tmp_path / "dir.onnx", lambda tmp: Path(tmp).write_text("x"))
    assert os.listdir(tmp_path / "dir.onnx") == []
    assert sorted(os.listdir(tmp_path)) == ["blocker", "dir.onnx"]


def test_output_folder_checks(tmp_path):
    (tmp_path / "blocker").write_text("data")
    user_folder(tmp_path / "reports")
    check_output_folder(tmp_path / "reports")  # files are added to a report folder, not replaced
    check_output_folder(tmp_path / "new" / "reports")
    for path in (tmp_path / "blocker", tmp_path / "blocker" / "reports"):
        with pytest.raises(ValueError, match="blocker is not a folder"):
            check_output_folder(path, "--report")


def test_unwritable_locations_are_refused(tmp_path, monkeypatch):
    """As root (these tests' user) chmod changes nothing: os.access, which the checks consult
    and which reports read-only file systems to root too, is made to say no for one folder."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(files.os, "access",
                        lambda path, mode: Path(path) != locked and real_access(path, mode))
    for check, path in ((check_output_file, locked / "m.onnx"),
                        (check_output_folder, locked / "reports"),
                        (check_output_folder, locked),
                        (check_replaceable_folder, locked / "ir")):
        with pytest.raises(ValueError, match=f"cannot write in {locked} "):
            check(path, "--output")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="cannot write in"):
            check_output_file(locked / "m.onnx")
    finally:
        locked.chmod(0o700)


def test_cli_refuses_an_unwritable_output_before_exporting(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(files.os, "access", lambda path, mode: Path(path) != locked)
    spec = importlib.util.spec_from_file_location("to_onnx", REPO / "export_scripts/to_onnx.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_:
        script.main([*TINY, "--checkpoint", str(tmp_path / "missing.pth"),
                     "--output", str(locked / "m.onnx")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --output {locked / 'm.onnx'}: cannot write in {locked} ")
    assert "missing.pth" not in error  # refused before the model (and its checkpoint) is read
    assert os.listdir(locked) == []


# ------------------------------------------------------------------ command-line tools

def test_exporting_into_a_folder_of_user_files_deletes_nothing(tmp_path):
    """The bug report: notes.txt and other.onnx were deleted and the exit code was 0."""
    folder = user_folder(tmp_path / "models-out")
    before = snapshot(tmp_path)
    result = run("export_scripts/to_openvino.py", *TINY, "--output", "models-out", cwd=tmp_path)
    assert_refused(result, "--output models-out", "not an lrformer-edge artifact", "notes.txt",
                   "other.onnx", "choose a new or empty folder")
    assert snapshot(tmp_path) == before
    assert (folder / "notes.txt").read_text() == "n\n"


@pytest.mark.slow  # one OpenVINO export of the tiny model, about 20 s
def test_a_previous_artifact_of_ours_is_replaced(tmp_path):
    target = previous_artifact(tmp_path / "lrformer-ov")
    result = run("export_scripts/to_openvino.py", *TINY, "--output", str(target))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(target)) == [ARTIFACT_MARKER, "lrformer-test.bin",
                                          "lrformer-test.xml"]
    assert sorted(os.listdir(tmp_path)) == ["lrformer-ov"]
    # what it wrote is recognised as ours the next time
    check_replaceable_folder(target)


@pytest.mark.parametrize("script, name", [("export_scripts/to_openvino.py", "out"),
                                          ("export_scripts/to_coreml.py", "out.mlpackage")],
                         ids=["openvino", "coreml"])
def test_a_regular_file_as_output_folder_is_refused_and_kept(tmp_path, script, name):
    (tmp_path / name).write_text("my data")
    result = run(script, *TINY, "--output", name, cwd=tmp_path)
    assert_refused(result, f"--output {name} is an existing file, not a folder")
    assert os.listdir(tmp_path) == [name]  # no .out.old-PID, no staging folder
    assert (tmp_path / name).read_text() == "my data"


def test_output_dot_is_refused_before_any_work(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run("export_scripts/to_openvino.py", *TINY, "--checkpoint", "missing.pth",
                 "--output", ".", cwd=tmp_path)
    assert_refused(result, "--output . is the current folder or contains it")
    assert "missing.pth" not in result.stderr  # the check came before loading anything
    assert os.listdir(tmp_path) == ["keep.txt"]  # no hidden 52 MB staging folder


CLI_OUTPUTS = [  # script, its other required arguments, the output flag, the path under it
    ("export_scripts/to_onnx.py", (), "--output", "m.onnx"),
    ("export_scripts/to_openvino.py", (), "--output", "ir"),
    ("export_scripts/to_tensorrt.py", ("--int8", "--onnx-only"), "--output", "m.engine"),
    ("export_scripts/to_coreml.py", (), "--output", "m.mlpackage"),
    ("calibration/qat.py", ("--data", "data"), "--output", "qat"),
    ("calibration/make_dataset.py", (), "--output", "data"),
    ("calibration/train.py", ("--variant", "lrformer-test", "--data", "data"), "--work-dir",
     "run"),
    ("deploy/validate.py", ("--artifacts", "m.onnx"), "--report", "report"),
    ("deploy/segment.py", ("image.png",), "--output", "masks"),
    ("deploy/quickstart.py", (), "--output", "quickstart"),
    ("deploy/benchmark.py", (), "--output", "benchmark"),
    ("deploy/camera_demo.py", ("--source", "clip.mp4"), "--output", "annotated.mp4"),
]


@pytest.mark.parametrize("script, args, flag, name", CLI_OUTPUTS,
                         ids=[Path(c[0]).stem for c in CLI_OUTPUTS])
def test_every_cli_refuses_an_output_under_a_file(tmp_path, script, args, flag, name):
    (tmp_path / "blocker").write_text("data")
    result = run(script, *args, flag, f"blocker/{name}", cwd=tmp_path)
    assert_refused(result, f"{flag} blocker/{name}", "blocker is not a folder")
    assert os.listdir(tmp_path) == ["blocker"]
    assert (tmp_path / "blocker").read_text() == "data"
