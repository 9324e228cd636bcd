"""Frame sources for live segmentation: a camera index, a video file, an image folder, or a
network stream (rtsp://, http(s)://).

Capture runs on its own thread. For live sources (camera, network) it keeps only the newest frame
(older ones are dropped), so inference never falls behind the scene however slow it is. Files are
not live: every frame is handed over in order (the reader waits for the consumer), so an
annotated video has one output frame per input frame; a frame that cannot be decoded (a corrupt
image, a truncated video) is skipped and reported, never mistaken for the end of the file.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrformer_edge.data.datasets import IMAGE_SUFFIXES

NETWORK_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://")
OPEN_TIMEOUT_MS = 5000
LOST_AFTER_FAILED_READS = 25  # ~1 s of failed reads from a live source: the camera is gone


class SourceError(ValueError):
    """A source that cannot be opened or read (missing camera, unreadable file...)."""


class UnreadableFrames(SourceError):
    """Frames of a file source that cannot be decoded: skipped with a warning, not fatal."""

    def __init__(self, message: str, count: int = 1):
        super().__init__(message)
        self.count = count


@dataclass
class Frame:
    image: np.ndarray  # HxWx3 uint8 RGB
    index: int
    capture_seconds: float


def describe_source(source: str) -> str:
    if source.isdigit():
        return f"camera {source}"
    return source


def is_live(source: str) -> bool:
    return source.isdigit() or source.lower().startswith(NETWORK_SCHEMES)


class _VideoReader:
    def __init__(self, source: str):
        import cv2

        self.cv2 = cv2
        if source.isdigit():
            capture = cv2.VideoCapture(int(source))
        elif source.lower().startswith(NETWORK_SCHEMES):
            capture = cv2.VideoCapture(source, cv2.CAP_FFMPEG,
                                       [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS,
                                        cv2.CAP_PROP_READ_TIMEOUT_MSEC, OPEN_TIMEOUT_MS])
        else:
            if not Path(source).is_file():
                raise SourceError(f"video file {source} does not exist")
            capture = cv2.VideoCapture(source)
        if not capture.isOpened():
            hint = {True: " (is a camera connected, and is this user allowed to open /dev/video*?)",
                    False: ""}[source.isdigit()]
            raise SourceError(f"cannot open {describe_source(source)}{hint}")
        self.capture = capture
        self.source = source
        self.fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        # Frames the file's header announces (0 for live sources): a file that ends before them
        # is truncated or corrupt, which must not pass for a normal end of stream.
        announced = 0 if is_live(source) else int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self.announced = max(0, announced)  # -1 when the container does not say
        self.position = 0

    def read(self) -> np.ndarray | None:
        ok, frame = self.capture.read()
        if not ok or frame is None:
            if self.position < self.announced:
                announced, self.announced = self.announced, self.position  # reported once
                raise UnreadableFrames(
                    f"{self.source} ends after {self.position} of the {announced} frames its "
                    f"header announces (truncated or corrupt file); skipped the missing "
                    f"{announced - self.position}", announced - self.position)
            return None
        self.position += 1
        return self.cv2.cvtColor(frame, self.cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self.capture.release()


class _FolderReader:
    def __init__(self, folder: Path):
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise SourceError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.position = 0
        self.fps = 0.0

    def read(self) -> np.ndarray | None:
        from lrformer_edge.data.datasets import DatasetError, read_image

        if self.position >= len(self.paths):
            return None
        self.position += 1
        try:
            return read_image(self.paths[self.position - 1])
        except DatasetError as error:
            raise UnreadableFrames(f"{error}; skipped it") from None

    def close(self) -> None:
        pass


def open_reader(source: str):
    if not source.isdigit() and Path(source).is_dir():
        return _FolderReader(Path(source))
    return _VideoReader(source)


class FrameSource:
    """``with FrameSource("0") as frames: frame = frames.next(timeout)`` (None at the end).

    Unreadable frames of a file or folder are skipped and counted in ``skipped``; ``on_skip``
    (called on the capture thread) gets one message naming them. Any other capture failure is
    raised, as a SourceError, by ``next``.
    """

    def __init__(self, source: str, max_frames: int | None = None, on_skip=None):
        self.source = str(source)
        self.live = is_live(self.source)
        self.max_frames = max_frames
        self.on_skip = on_skip
        self.reader = open_reader(self.source)  # fails here, before any thread starts
        self.end_reason: str | None = None
        self.dropped = 0
        self.skipped = 0
        self._error: SourceError | None = None
        self._slot: Frame | None = None
        self._finished = False
        self._condition = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._capture, name="capture", daemon=True)

    @property
    def fps(self) -> float:
        return self.reader.fps

    def __enter__(self) -> "FrameSource":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        with self._condition:
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.reader.close()

    def _capture(self) -> None:
        index, failures = 0, 0
        while not self._stop.is_set():
            if self.max_frames is not None and index >= self.max_frames:
                self._finish(f"reached --max-frames {self.max_frames}")
                return
            start = time.perf_counter()
            try:
                image = self.reader.read()
            except UnreadableFrames as error:
                self.skipped += error.count
                if self.on_skip is not None:
                    self.on_skip(str(error))
                continue
            except Exception as error:  # handed to the consumer: a dead thread would just stall it
                self._fail(SourceError(f"reading {describe_source(self.source)} failed: {error}"))
                return
            if image is None:
                if self.live:
                    failures += 1
                    if failures < LOST_AFTER_FAILED_READS:
                        time.sleep(0.04)
                        continue
                    self._finish(f"lost {describe_source(self.source)} (no frame for "
                                 f"{failures} reads)")
                else:
                    self._finish("end of stream")
                return
            failures = 0
            frame = Frame(image, index, time.perf_counter() - start)
            index += 1
            with self._condition:
                if not self.live:
                    while self._slot is not None and not self._stop.is_set():
                        self._condition.wait(0.1)
                elif self._slot is not None:
                    self.dropped += 1
                self._slot = frame
                self._condition.notify_all()

    def _finish(self, reason: str) -> None:
        with self._condition:
            self.end_reason = reason
            self._finished = True
            self._condition.notify_all()

    def _fail(self, error: SourceError) -> None:
        with self._condition:
            self._error = error
            self._finished = True
            self._condition.notify_all()

    def next(self, timeout: float = 10.0) -> Frame | None:
        """The newest frame not yet taken; None when the source has ended."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while self._slot is None:
                if self._error is not None:
                    raise self._error
                if self._finished:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.end_reason = f"no frame from {describe_source(self.source)} for " \
                                      f"{timeout:.0f} s"
                    return None
                self._condition.wait(remaining)
            frame, self._slot = self._slot, None
            self._condition.notify_all()
            return frame
