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

from lrformer_edge.data.postprocess import colorize
from lrformer_edge.data.procedural import write_procedural_video
from lrformer_edge.export.onnx import export_onnx
from lrformer_edge.live.annotate import PANEL_WIDTH
from lrformer_edge.live.demo import DemoOptions, run_demo
from lrformer_edge.live.mjpeg import MjpegServer
from lrformer_edge.live.sources import FrameSource, SourceError
from lrformer_edge.models.factory import create_model
from lrformer_edge.pipeline import SegmentationPipeline
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
    with FrameSource(str(clip)) as frames:
        frames.live = True  # a camera: stale frames are dropped, the end is a lost device
        time.sleep(0.5)  # the consumer is slow; the reader has long read every frame
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
