"""The live demo, headless, on videos generated from procedural scenes (no mocks, no camera)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from lrformer_edge.backends.onnxruntime.export import export_onnx
from lrformer_edge.data.procedural import write_procedural_video
from lrformer_edge.live.annotate import PANEL_WIDTH
from lrformer_edge.live.demo import DemoOptions, run_demo
from lrformer_edge.live.mjpeg import MjpegServer
from lrformer_edge.live.sources import FrameSource, SourceError
from lrformer_edge.models.factory import create_model
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.postprocess import colorize
from lrformer_edge.registry import BUNDLED_MODEL

REPO = Path(__file__).resolve().parents[1]
FRAMES, HEIGHT, WIDTH = 10, 240, 320


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "scenes.avi"
    write_procedural_video(path, FRAMES, HEIGHT, WIDTH, fps=10)
    return path


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo-model") / "bundled-128.onnx"
    export_onnx(create_model(BUNDLED_MODEL), path, (128, 128))
    return path


def _frames(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))


def test_annotated_video_has_every_frame_and_the_predicted_colours(clip, onnx_model, tmp_path):
    output = tmp_path / "annotated.mp4"
    pipeline = SegmentationPipeline.from_artifact(onnx_model)
    summary = run_demo(pipeline, DemoOptions(source=str(clip), output=output, opacity=1.0))
    assert summary.frames == FRAMES and summary.end_reason == "end of stream"
    assert summary.output == str(output) and summary.dropped == 0
    assert all(len(v) == FRAMES for v in summary.stage_ms.values())
    assert not list(tmp_path.glob(".annotated*"))  # no temporary left behind
    written, inputs = _frames(output), _frames(clip)
    assert len(written) == FRAMES and written[0].shape == (HEIGHT, WIDTH, 3)
    palette = np.asarray(pipeline.data.palette, np.int32)
    with pipeline:
        for frame_in, frame_out in zip(inputs[:3], written[:3]):
            labels = pipeline(frame_in)
            region = (slice(0, HEIGHT), slice(PANEL_WIDTH + 5, WIDTH))  # right of the panels
            expected = labels[region]
            got = frame_out[region].astype(np.int32)
            nearest = np.argmin(((got[..., None, :] - palette) ** 2).sum(-1), axis=-1)
            assert (nearest == expected).mean() > 0.9
            assert np.abs(got - colorize(expected, pipeline.data.palette)).mean() < 12


def test_mjpeg_endpoint_serves_frames_opencv_reads(clip, onnx_model):
    pipeline = SegmentationPipeline.from_artifact(onnx_model)
    stop, received = threading.Event(), []

    def read_stream(server):
        def reader():
            capture = cv2.VideoCapture(server.url + "stream")
            while capture.isOpened() and len(received) < 3:
                ok, frame = capture.read()
                if not ok:
                    break
                received.append(frame)
            capture.release()
            stop.set()

        assert server.url.startswith("http://127.0.0.1:")
        threading.Thread(target=reader, daemon=True).start()

    options = DemoOptions(source=str(clip), serve=("127.0.0.1", 0), hold=True)
    watchdog = threading.Timer(60, stop.set)
    watchdog.start()
    summary = run_demo(pipeline, options, on_server_ready=read_stream, stop=stop)
    watchdog.cancel()
    assert 1 <= summary.frames <= FRAMES and summary.end_reason == "stopped"
    assert len(received) == 3 and received[0].shape == (HEIGHT, WIDTH, 3)


def test_mjpeg_server_single_frame_and_page():
    import urllib.request

    with MjpegServer("127.0.0.1", 0) as server:
        server.publish(np.full((32, 48, 3), (255, 0, 0), np.uint8))
        page = urllib.request.urlopen(server.url, timeout=5).read()
        jpeg = urllib.request.urlopen(server.url + "frame.jpg", timeout=5).read()
    assert b"/stream" in page
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (32, 48, 3) and image[..., 2].mean() > 200  # red, in BGR


def test_live_sources_hand_over_the_newest_frame_and_notice_a_lost_camera(clip):
    source = FrameSource(str(clip))
    # A camera: stale frames are dropped, the end is a lost device. Set before the reader thread
    # starts, or it may already hold frame 0 as a file source, waiting for it to be taken.
    source.live = True
    with source as frames:
        # The consumer is slow: it asks only once the reader has read every frame and given up.
        deadline = time.monotonic() + 30
        while frames.end_reason is None and time.monotonic() < deadline:
            time.sleep(0.05)
        newest = frames.next(timeout=5)
        assert newest.index == FRAMES - 1
        assert frames.dropped == FRAMES - 1
        assert frames.next(timeout=10) is None
        assert frames.end_reason.startswith("lost")


def test_bad_sources_fail_fast_with_a_clear_message(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        FrameSource(str(tmp_path / "missing.mp4"))
    with pytest.raises(SourceError, match="holds no images"):
        FrameSource(str(tmp_path))
    start = time.time()
    with pytest.raises(SourceError, match="cannot open camera 57"):
        FrameSource("57")
    assert time.time() - start < 15
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(SourceError, match="cannot open"):
        FrameSource(str(tmp_path / "broken.mp4"))


def test_image_folder_source_and_max_frames(tmp_path, onnx_model):
    for i, frame in enumerate(_frames_of_scenes(3)):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    pipeline = SegmentationPipeline.from_artifact(onnx_model)
    summary = run_demo(pipeline, DemoOptions(source=str(tmp_path), max_frames=2,
                                             output=tmp_path / "out.avi"))
    assert summary.frames == 2 and "max-frames" in summary.end_reason
    assert len(_frames(tmp_path / "out.avi")) == 2


def _frames_of_scenes(count):
    from lrformer_edge.data.procedural import generate_scene

    return [generate_scene(20_000_000 + i, 96, 128).image for i in range(count)]


def test_cli_reference_check_ctrl_c_and_summary(clip, onnx_model, tmp_path):
    command = [sys.executable, str(REPO / "deploy/camera_demo.py"), "--artifact", str(onnx_model),
               "--source", str(clip), "--serve", "0", "--hold", "--reference-every", "2",
               "--output", str(tmp_path / "out.avi"), "--summary-json", str(tmp_path / "s.json")]
    # As in a terminal: a test run started in the background (``cmd &`` in a script) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler in the demo.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        while not any("serving MJPEG at http://127.0.0.1:" in line for line in lines):
            line = process.stdout.readline()
            assert line, process.stderr.read()
            lines.append(line)
        while not any("still serving the last frame" in line for line in lines):
            line = process.stdout.readline()
            assert line, process.stderr.read()
            lines.append(line)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    out = "".join(lines) + out
    assert f"end of stream after {FRAMES} frames" in out
    assert f"{FRAMES} frames" in out and "interrupted (Ctrl-C)" in out
    assert "agreement with the FP32 reference on 5 checked frames" in out
    import json

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["frames"] == FRAMES and summary["reference_agreement"] > 0.9
    assert (tmp_path / "out.avi").is_file()


def test_cli_needs_a_destination_and_a_readable_source(clip, tmp_path):
    script = str(REPO / "deploy/camera_demo.py")
    nothing = subprocess.run([sys.executable, script, "--source", "x.mp4"], capture_output=True,
                             text=True, cwd=tmp_path)
    assert nothing.returncode == 2 and "nothing to show" in nothing.stderr
    missing = subprocess.run([sys.executable, script, "--source", "x.mp4", "--output", "o.mp4"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "video file x.mp4 does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and not list(tmp_path.iterdir())
    if os.environ.get("DISPLAY") is None:
        show = subprocess.run([sys.executable, script, "--source", str(clip), "--show"],
                              capture_output=True, text=True, cwd=tmp_path)
        assert show.returncode == 2 and "--show needs a display" in show.stderr


TINY = ["--variant", "lrformer-test", "--input-size", "64", "64"]  # the bundled model, tiny


def _demo(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "deploy/camera_demo.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def _image_folder(folder, count, unreadable=()):
    folder.mkdir()
    for i, frame in enumerate(_frames_of_scenes(count)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    for name in unreadable:
        (folder / name).write_bytes(b"not an image at all")
    return folder


def test_cli_skips_an_unreadable_image_with_a_warning_naming_it(tmp_path):
    folder = _image_folder(tmp_path / "images", 3)
    (folder / "001.png").write_bytes(b"\x89PNG garbage")
    run = _demo(*TINY, "--source", str(folder), "--output", "out.avi", "--summary-json", "s.json",
                cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "001.png" in warnings[0]
    assert "2 frames" in run.stdout and "skipped 1 unreadable frames" in run.stdout
    import json

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["frames"] == 2 and summary["skipped_frames"] == 1
    assert summary["end"] == "end of stream"
    assert len(_frames(tmp_path / "out.avi")) == 2


def test_cli_source_without_a_readable_frame_fails_and_writes_nothing(tmp_path):
    folder = _image_folder(tmp_path / "images", 0, unreadable=("a.png", "b.jpg"))
    run = _demo(*TINY, "--source", str(folder), "--output", "out.avi", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no readable frame in {folder}: all 2 frames were unreadable"]
    assert "a.png" in run.stderr and "b.jpg" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no video, no temporary


def test_truncated_video_reports_the_missing_frames_as_skipped(clip, tmp_path):
    data = clip.read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data[:len(data) // 2])
    messages, indices = [], []
    with FrameSource(str(truncated), on_skip=messages.append) as frames:
        while (frame := frames.next(timeout=10)) is not None:
            indices.append(frame.index)
    assert 0 < len(indices) < FRAMES and indices == list(range(len(indices)))
    assert frames.skipped == FRAMES - len(indices) and frames.end_reason == "end of stream"
    assert len(messages) == 1 and str(truncated) in messages[0]
    assert f"{len(indices)} of the {FRAMES} frames" in messages[0]


def test_cli_variant_reaches_a_checkpoint_that_does_not_record_one(tmp_path):
    import torch

    from lrformer_edge.models.checkpoint import save_mmseg_checkpoint

    folder = _image_folder(tmp_path / "images", 1)
    state = create_model("lrformer-test").state_dict()
    torch.save(state, tmp_path / "plain.pth")  # as official checkpoints: no variant recorded
    run = _demo("--artifact", "plain.pth", *TINY, "--source", str(folder), "--output", "out.avi",
                cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "running pytorch:lrformer-test" in run.stdout
    assert len(_frames(tmp_path / "out.avi")) == 1

    save_mmseg_checkpoint(state, tmp_path / "tagged.pth", meta={"variant": "lrformer-test"})
    wrong = _demo("--artifact", "tagged.pth", "--variant", "lrformer-t", "--source", str(folder),
                  "--output", "wrong.avi", cwd=tmp_path)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.startswith("error: variant lrformer-t was asked for, but tagged.pth "
                                   "records variant lrformer-test")
    assert not (tmp_path / "wrong.avi").exists()


def test_a_runner_option_its_backend_lacks_is_one_clear_error(tmp_path):
    path = tmp_path / "tiny.onnx"
    export_onnx(create_model("lrformer-test"), path, (64, 64))
    folder = _image_folder(tmp_path / "images", 1)
    run = _demo("--artifact", str(path), "--precision", "bf16", "--source", str(folder),
                "--output", "out.avi", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr == (f"error: --precision applies to OpenVINO IR artifacts only, not to "
                          f"{path}\n")
    assert not (tmp_path / "out.avi").exists()


def test_load_runner_rejects_a_variant_an_exported_artifact_contradicts(tmp_path):
    from lrformer_edge.backends import load_runner

    path = tmp_path / "tiny.onnx"
    export_onnx(create_model("lrformer-test"), path, (64, 64))
    assert load_runner(path, variant="lrformer-test").metadata["variant"] == "lrformer-test"
    with pytest.raises(ValueError, match="variant lrformer-t was asked for, .* records variant "
                                         "lrformer-test"):
        load_runner(path, variant="lrformer-t")


def test_cli_sigterm_finishes_the_video_and_prints_the_summary(clip, tmp_path):
    command = [sys.executable, str(REPO / "deploy/camera_demo.py"), *TINY, "--source", str(clip),
               "--serve", "0", "--hold", "--output", str(tmp_path / "out.avi"),
               "--summary-json", str(tmp_path / "s.json")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path)
    try:
        lines = []
        while not any("still serving the last frame" in line for line in lines):
            line = process.stdout.readline()
            assert line, process.stderr.read()
            lines.append(line)
        process.send_signal(signal.SIGTERM)  # as systemd and docker stop do
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err  # as for Ctrl-C
    assert "Traceback" not in err
    out = "".join(lines) + out
    assert f"{FRAMES} frames" in out and "terminated (SIGTERM)" in out
    assert f"annotated video: {tmp_path / 'out.avi'}" in out
    import json

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["frames"] == FRAMES and summary["end"] == "terminated (SIGTERM)"
    written = _frames(tmp_path / "out.avi")
    assert len(written) == FRAMES and written[0].shape == (HEIGHT, WIDTH, 3)
    assert not list(tmp_path.glob(".out*"))  # the temporary was renamed into place
