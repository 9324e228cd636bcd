"""The live segmentation loop: source -> SegmentationPipeline (any backend) -> annotate ->
video file / MJPEG server / window, with per-stage timing and an optional live check against
the FP32 reference every N frames.
"""
from __future__ import annotations

import contextlib
import os
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrformer_edge.live.annotate import annotate
from lrformer_edge.live.sources import FrameSource, SourceError
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.registry import BUNDLED_MODEL

STAGES = ("capture", "preprocess", "inference", "postprocess")


@dataclass
class DemoOptions:
    source: str = "0"
    output: Path | None = None
    serve: tuple[str, int] | None = None
    show: bool = False
    max_frames: int | None = None
    opacity: float = 0.5
    reference_every: int = 0  # 0: no live check
    frame_timeout: float = 10.0
    hold: bool = False  # with serve: keep serving the last frame after the source ends


@dataclass
class DemoSummary:
    frames: int = 0
    seconds: float = 0.0
    end_reason: str = ""
    dropped: int = 0
    skipped: int = 0  # unreadable frames of a file or folder
    stage_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    frame_intervals: list[float] = field(default_factory=list)
    agreements: list[float] = field(default_factory=list)
    output: str | None = None
    settings: dict = field(default_factory=dict)

    @property
    def mean_fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def median_fps(self) -> float:
        if not self.frame_intervals:
            return self.mean_fps
        return 1.0 / max(statistics.median(self.frame_intervals), 1e-9)

    def as_dict(self) -> dict:
        return {"frames": self.frames, "seconds": round(self.seconds, 3),
                "mean_fps": round(self.mean_fps, 2), "median_fps": round(self.median_fps, 2),
                "dropped_frames": self.dropped, "skipped_frames": self.skipped,
                "end": self.end_reason,
                "stage_median_ms": {s: round(statistics.median(v), 2) if v else None
                                    for s, v in self.stage_ms.items()},
                "reference_agreement": (round(float(np.mean(self.agreements)), 5)
                                        if self.agreements else None),
                "output": self.output, "runner_settings": self.settings}

    def describe(self) -> str:
        d = self.as_dict()
        stages = ", ".join(f"{s} {v:.1f} ms" for s, v in d["stage_median_ms"].items()
                           if v is not None)
        lines = [f"runner settings: {self.settings}",
                 f"{d['frames']} frames in {d['seconds']:.1f} s ({d['end']}): mean "
                 f"{d['mean_fps']:.2f} FPS, median {d['median_fps']:.2f} FPS; dropped "
                 f"{d['dropped_frames']} stale frames"
                 + (f", skipped {self.skipped} unreadable frames" if self.skipped else ""),
                 f"median per stage: {stages}"]
        if d["reference_agreement"] is not None:
            lines.append(f"agreement with the FP32 reference on {len(self.agreements)} checked "
                         f"frames: {100 * d['reference_agreement']:.2f}%")
        if self.output:
            lines.append(f"annotated video: {self.output}")
        return "\n".join(lines)


class _VideoSink:
    """Annotated frames to a video file, written under a temporary name and renamed at the end."""

    def __init__(self, path: Path, fps: float):
        self.path = Path(path).resolve()
        self.fps = fps if 1 <= fps <= 240 else 15.0
        self.writer = None
        self.temp: Path | None = None

    def write(self, rgb: np.ndarray) -> None:
        import cv2

        if self.writer is None:
            # OpenCV picks the container from the name, so the temporary name keeps the suffix.
            handle, temp = tempfile.mkstemp(prefix=f".{self.path.stem}.",
                                            suffix=self.path.suffix, dir=self.path.parent)
            os.close(handle)
            self.temp = Path(temp)
            fourcc = cv2.VideoWriter_fourcc(*("mp4v" if self.path.suffix == ".mp4" else "MJPG"))
            self.writer = cv2.VideoWriter(str(self.temp), fourcc, self.fps,
                                          (rgb.shape[1], rgb.shape[0]))
            if not self.writer.isOpened():
                raise ValueError(f"OpenCV cannot write {self.path.suffix} video here; use .mp4 "
                                 f"or .avi")
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self, keep: bool) -> bool:
        """Finish the file; renamed into place when ``keep`` and a frame was written."""
        if self.writer is None:
            return False
        self.writer.release()
        if keep:
            from lrformer_edge.files import default_file_mode

            os.chmod(self.temp, default_file_mode())
            os.replace(self.temp, self.path)
            return True
        self.temp.unlink(missing_ok=True)
        return False


class _Window:
    def __init__(self):
        import cv2

        self.cv2 = cv2
        try:
            cv2.namedWindow("LRFormer Edge", cv2.WINDOW_NORMAL)
        except cv2.error:
            raise ValueError("--show needs a display and a GUI build of OpenCV "
                             "(pip install opencv-python); on a headless device use --output "
                             "FILE.mp4 or --serve PORT") from None

    def show(self, rgb: np.ndarray) -> bool:
        """False when the user closed the window or pressed q/Esc."""
        self.cv2.imshow("LRFormer Edge", self.cv2.cvtColor(rgb, self.cv2.COLOR_RGB2BGR))
        return self.cv2.waitKey(1) & 0xFF not in (ord("q"), 27)

    def close(self) -> None:
        self.cv2.destroyAllWindows()


def open_pipeline(artifact: str | Path | None = None, variant: str | None = None,
                  input_size: tuple[int, int] | None = None,
                  runner_options: dict | None = None) -> SegmentationPipeline:
    """What the demo runs: ``artifact`` of any backend (``runner_options`` for its runner, e.g.
    ``{"precision": "bf16"}``), else the variant's bundled PyTorch model. ``input_size``
    overrides an artifact's own."""
    if artifact is None:
        return SegmentationPipeline.from_model(_model(variant), input_size)
    pipeline = SegmentationPipeline.from_artifact(artifact, variant=variant,
                                                  **(runner_options or {}))
    if input_size:
        pipeline.input_size = tuple(input_size)
    return pipeline


def reference_pipeline(pipeline: SegmentationPipeline, variant: str | None = None,
                       checkpoint: str | None = None) -> SegmentationPipeline:
    """The FP32 PyTorch model (bundled, or ``checkpoint``) at the input size of ``pipeline``."""
    return SegmentationPipeline.from_model(_model(variant, checkpoint), pipeline.input_size)


def _model(variant: str | None, checkpoint: str | None = None):
    # PyTorch loads only here: a device running an exported artifact may not have it.
    from lrformer_edge.models.factory import create_model

    return create_model(variant or BUNDLED_MODEL, checkpoint=checkpoint)


def check_options(options: DemoOptions) -> None:
    if not 0 <= options.opacity <= 1:
        raise ValueError(f"opacity must lie in [0, 1], got {options.opacity}")
    if options.hold and options.serve is None:
        raise ValueError("hold applies to serve only (it keeps the MJPEG server up)")
    if options.max_frames is not None and options.max_frames < 1:
        raise ValueError(f"max_frames must be positive, got {options.max_frames}")
    if options.output is not None and Path(options.output).suffix not in (".mp4", ".avi"):
        raise ValueError(f"--output must end in .mp4 or .avi, got {options.output}")
    if options.output is not None and not Path(options.output).resolve().parent.is_dir():
        raise ValueError(f"folder of --output {options.output} does not exist")


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd, ``docker stop``): ends the run as Ctrl-C does, the video finished."""


@contextlib.contextmanager
def sigterm_ends_run():
    """Within, SIGTERM raises Terminated in the main thread; later ones are ignored while the
    run finishes its video (the service manager escalates to SIGKILL if that hangs)."""
    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(pipeline, options: DemoOptions, reference=None, on_server_ready=None,
             stop=None, on_hold=None, on_skip=None) -> DemoSummary:
    """Run until the source ends, ``max_frames``, the window closes, ``stop`` (an Event) is set
    or Ctrl-C (``on_hold(summary)`` is called when the source ends and ``hold`` keeps the server
    up). ``reference``: a SegmentationPipeline of the FP32 model, checked every
    ``options.reference_every`` frames. Unreadable frames of a file or folder are skipped and
    counted, ``on_skip(message)`` (on the capture thread) naming them; a source with no readable
    frame at all raises SourceError."""
    check_options(options)
    summary = DemoSummary()
    # a bad source raises here, before anything opens
    source = FrameSource(options.source, options.max_frames, on_skip=on_skip)
    sink = window = server = None
    completed = False
    try:
        sink = _VideoSink(options.output, source.fps) if options.output else None
        window = _Window() if options.show else None
        if options.serve is not None:
            from lrformer_edge.live.mjpeg import MjpegServer

            server = MjpegServer(*options.serve).__enter__()
            if on_server_ready is not None:
                on_server_ready(server)
        with source, pipeline, reference or contextlib.nullcontext():
            summary.settings = dict(pipeline.runner.settings)
            _loop(pipeline, source, options, summary, sink, window, server, reference, stop)
            if server is not None and options.hold:
                if on_hold is not None:
                    on_hold(summary)
                _hold(stop)
        completed = True
    except KeyboardInterrupt as interrupt:
        summary.end_reason = ("terminated (SIGTERM)" if isinstance(interrupt, Terminated)
                              else "interrupted (Ctrl-C)")
        completed = True
    finally:
        source.close()
        summary.dropped, summary.skipped = source.dropped, source.skipped
        if sink is not None:
            kept = sink.close(keep=completed)
            summary.output = str(options.output) if kept else None
        if window is not None:
            window.close()
        if server is not None:
            server.close()
    return summary


def _loop(pipeline, source, options, summary, sink, window, server, reference, stop) -> None:
    start = last = time.perf_counter()
    while True:
        if stop is not None and stop.is_set():
            summary.end_reason = "stopped"
            break
        frame = source.next(options.frame_timeout)
        if frame is None:
            if not summary.frames and source.skipped:
                raise SourceError(f"no readable frame in {options.source}: all {source.skipped} "
                                  f"frames were unreadable")
            summary.end_reason = source.end_reason or "end of stream"
            break
        prediction = pipeline.predict(frame.image)
        if reference is not None and options.reference_every \
                and frame.index % options.reference_every == 0:
            expected = reference.predict(frame.image).labels
            summary.agreements.append(float((expected == prediction.labels).mean()))
        annotate_start = time.perf_counter()
        annotated = annotate(frame.image, prediction.labels, pipeline.data, options.opacity,
                             _status_lines(summary, pipeline))
        postprocess = prediction.postprocess_seconds + time.perf_counter() - annotate_start
        for stage, seconds in zip(STAGES, (frame.capture_seconds, prediction.preprocess_seconds,
                                           prediction.inference_seconds, postprocess)):
            summary.stage_ms[stage].append(1000 * seconds)
        now = time.perf_counter()
        if summary.frames:
            summary.frame_intervals.append(now - last)
        last = now
        summary.frames += 1
        summary.seconds = now - start
        if sink is not None:
            sink.write(annotated)
        if server is not None:
            server.publish(annotated)
        if window is not None and not window.show(annotated):
            summary.end_reason = "window closed"
            break


def _hold(stop) -> None:
    """Keep the server up (the last frame stays visible) until ``stop`` or Ctrl-C."""
    while stop is None or not stop.is_set():
        time.sleep(0.1)


def _status_lines(summary: DemoSummary, pipeline) -> list[str]:
    recent = summary.frame_intervals[-30:]
    fps = 1.0 / statistics.median(recent) if recent else 0.0
    last = {s: v[-1] for s, v in summary.stage_ms.items() if v}
    lines = [f"{pipeline.runner.backend}  {fps:5.1f} FPS",
             f"cap {last.get('capture', 0):.0f}  pre {last.get('preprocess', 0):.0f} ms",
             f"inf {last.get('inference', 0):.0f}  post {last.get('postprocess', 0):.0f} ms"]
    if summary.agreements:
        lines.append(f"vs FP32: {100 * np.mean(summary.agreements):.1f}% agree")
    return lines

