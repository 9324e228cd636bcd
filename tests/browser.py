"""Headless Chromium for the tests that check a self-contained HTML page in a real browser."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                  "google-chrome", "chrome"))), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs a headless Chromium (Debian: apt install chromium)")
_HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def rendered_dom(page: Path) -> str:
    """The page's DOM after its scripts ran."""
    dom = subprocess.run([CHROMIUM, *_HEADLESS, "--virtual-time-budget=10000", "--dump-dom",
                          page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout


def assert_renders_content(page: Path, tmp_path: Path) -> None:
    """A screenshot of the page shows rendered content, not a blank page."""
    screenshot = tmp_path / "page.png"
    shot = subprocess.run([CHROMIUM, *_HEADLESS, f"--screenshot={screenshot}",
                           "--window-size=1280,2000", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.is_file()
    import cv2

    pixels = cv2.imread(str(screenshot))
    assert pixels is not None and np.std(pixels) > 10
