"""Progress of long steps: a live line on a terminal, a plain line every few seconds elsewhere.

Every step that may take more than a few seconds goes through one of two calls:

* ``track(iterable, total, what, label)`` for steps made of countable items (calibration
  images, validation images, training iterations): done / total, elapsed time and ETA;
* ``heartbeat(label)`` for one call that cannot count (an ONNX export, a torch.export, a
  lowering stage, a compile check): elapsed time.

Where stderr is a terminal, the steps under way share one live line, redrawn in place. Where it
is not (CI logs, ``nohup``, pipes), a step writes a full line every ``LINE_INTERVAL_S`` seconds
(a ``track`` also one as soon as its first item is done) and one when it ends, with its total
time, so that no step stays silent in a log. A background thread writes these lines, so a single
slow item or call is reported too. A step that fails before it showed anything stays silent:
bad input is reported by its own error line, not by progress lines around it. Everything goes
to stderr; stdout keeps only the results.

Environment:

* ``LRFORMER_PROGRESS=0`` (or ``off``, ``false``, ``no``) turns all of it off, for quiet logs;
* ``LRFORMER_PROGRESS_INTERVAL=SECONDS`` sets the interval of the plain lines (default 5);
* under ``torchrun`` only the process of rank 0 shows progress.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

DEFAULT_INTERVAL_S = 5.0
INTERVAL_VARIABLE = "LRFORMER_PROGRESS_INTERVAL"
SWITCH_VARIABLE = "LRFORMER_PROGRESS"
_OFF = ("0", "off", "false", "no")
_REDRAW_S = 0.25  # the live line on a terminal
_BAR_WIDTH = 20
_SPINNER = "|/-\\"

T = TypeVar("T")


def _interval_from_environment() -> float:
    text = os.environ.get(INTERVAL_VARIABLE, "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        print(f"warning: {INTERVAL_VARIABLE}={text!r} is not a positive number of seconds; "
              f"progress lines every {DEFAULT_INTERVAL_S:g} s", file=sys.stderr)
        return DEFAULT_INTERVAL_S
    return value


# Seconds between two progress lines where stderr is not a terminal.
LINE_INTERVAL_S = _interval_from_environment()

_lock = threading.RLock()
_active: list[_Step] = []  # steps under way, outermost first: they share the live line


def enabled() -> bool:
    """Whether progress is shown: not switched off, and the main process under torchrun."""
    switched_off = os.environ.get(SWITCH_VARIABLE, "").strip().lower() in _OFF
    return not switched_off and os.environ.get("RANK", "0") == "0"


def _on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def duration(seconds: float, decimals: int = 1) -> str:
    """'18.3 s', '4 min 05 s', '1 h 02 min'."""
    if seconds < 100:
        return f"{seconds:.{decimals}f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class _Step:
    """A step under way: its ticker thread writes a line every ``LINE_INTERVAL_S`` (or redraws
    the live line) until ``finish``."""

    def __init__(self, label: str):
        self.label = label
        self.live = _on_terminal()
        self.shown = False  # whether a line (or the live line) has shown this step
        self.start = self.last_line = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True,
                                        name=f"progress: {label}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def prefix(self) -> str:
        return f"{self.label}: " if self.label else ""

    def line(self) -> str:  # a plain line while under way
        raise NotImplementedError

    def live_text(self) -> str:  # its part of the live line
        raise NotImplementedError

    def begin(self) -> None:
        with _lock:
            _active.append(self)
        self._thread.start()

    def show(self) -> None:
        """Write its line now (on a terminal: redraw the live line)."""
        with _lock:
            if self._stop.is_set():
                return
            if self.live:
                _redraw()
            else:
                _write(self.line())
                self.shown, self.last_line = True, time.monotonic()

    def finish(self, last_line: str, failed: bool = False) -> None:
        """Stop the ticker and write ``last_line``; a failed step that showed nothing says
        nothing (the error that ended it speaks for it)."""
        self._stop.set()
        self._thread.join()
        with _lock:
            _active.remove(self)
            if self.shown or not failed:
                _write(last_line, clear=self.live)
            elif self.live:
                _write("", clear=True, newline=False)
            if self.live and _active:
                _redraw()

    def _tick(self) -> None:
        """A line ``LINE_INTERVAL_S`` after the last one (the live line: every ``_REDRAW_S``)."""
        while True:
            due = _REDRAW_S if self.live else self.last_line + LINE_INTERVAL_S - time.monotonic()
            if self._stop.wait(max(0.0, due)):
                return
            if self.live or time.monotonic() >= self.last_line + LINE_INTERVAL_S:
                self.show()


class _Counted(_Step):
    def __init__(self, label: str, total: int | None, what: str):
        super().__init__(label)
        self.total, self.what, self.done = total, what, 0

    def count(self) -> str:
        return f"{self.done}/{self.total} {self.what}" if self.total is not None else \
            f"{self.done} {self.what}"

    def eta(self) -> str:
        if self.total is None or self.done == 0:
            return ""
        left = max(0, self.total - self.done) * self.elapsed / self.done
        return f", ETA {duration(left, 0)}"

    def line(self) -> str:
        return f"{self.prefix()}{self.count()}, {duration(self.elapsed)}{self.eta()}"

    def live_text(self) -> str:
        bar = ""
        if self.total:
            filled = min(_BAR_WIDTH, _BAR_WIDTH * self.done // self.total)
            bar = f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] "
        return f"{self.prefix()}{bar}{self.count()}, {duration(self.elapsed)}{self.eta()}"


class _Heartbeat(_Step):
    def line(self) -> str:
        return f"{self.prefix()}still running, {duration(self.elapsed, 0)}"

    def live_text(self) -> str:
        spin = _SPINNER[int(self.elapsed / _REDRAW_S) % len(_SPINNER)]
        return f"{self.prefix()}{spin} {duration(self.elapsed)}"


def _write(text: str, clear: bool = False, newline: bool = True) -> None:
    """One line on stderr (after clearing the live line); never fails the step it reports."""
    try:
        stream = sys.stderr
        stream.write(("\r\x1b[K" if clear else "") + text + ("\n" if newline else ""))
        stream.flush()
    except (OSError, ValueError, AttributeError):  # closed or broken stderr: progress is optional
        pass


def _redraw() -> None:
    """The live line: every step under way, cut to the terminal's width (a wrapped line could
    not be redrawn in place); the cursor goes back to the start, so that whatever else is
    printed overwrites it instead of following it."""
    text = " | ".join(step.live_text() for step in _active)
    for step in _active:
        step.shown = True
    width = shutil.get_terminal_size((100, 24)).columns - 1
    try:
        sys.stderr.write("\r" + text[:width] + "\x1b[K\r")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def _length(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def track(iterable: Iterable[T], total: int | None = None, what: str = "items",
          label: str = "") -> Iterator[T]:
    """Yield the items of ``iterable`` while showing ``label: 12/64 items, 18.3 s, ETA 79 s``.

    ``total`` defaults to ``len(iterable)``; give it for generators (without one, the count and
    the elapsed time are shown, no ETA). An item counts as done when the next one is asked for;
    the first line comes when the first item is done. The last line gives the total time, or
    says where the loop ``stopped`` (left by ``break`` or by an exception in its body) or
    ``failed`` (the iterable itself raised)."""
    if not enabled():
        yield from iterable
        return
    step = _Counted(label, _length(iterable) if total is None else total, what)
    step.begin()
    outcome = "failed at"
    try:
        for item in iterable:
            yield item
            step.done += 1
            if not step.shown:
                step.show()
        outcome = ""
    except GeneratorExit:
        outcome = "stopped at"
        raise
    finally:
        if outcome:
            step.finish(f"{step.prefix()}{outcome} {step.count()} after "
                        f"{duration(step.elapsed)}", failed=True)
        else:
            step.finish(f"{step.prefix()}{step.count()} in {duration(step.elapsed)}")


@contextmanager
def heartbeat(label: str) -> Iterator[None]:
    """Show that the step ``label`` is still running (for one call that cannot count): a line
    ``label: still running, 40 s`` every ``LINE_INTERVAL_S``, and ``label: done in 52.1 s`` (or
    ``failed after``, and the exception goes on) at the end."""
    if not enabled():
        yield
        return
    step = _Heartbeat(label)
    step.begin()
    try:
        yield
    except BaseException:
        step.finish(f"{step.prefix()}failed after {duration(step.elapsed)}", failed=True)
        raise
    step.finish(f"{step.prefix()}done in {duration(step.elapsed)}")
