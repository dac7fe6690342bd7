"""The HTML report in headless Chromium: it loads without console errors and renders.

Chromium prints every console message of the page on stderr with ``--enable-logging=stderr``
(``[pid:tid:...:INFO:CONSOLE:1] "Uncaught ReferenceError: ...", source: file://...``);
test_detector_sees_planted_errors checks that this detection works on a page with a JS error.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from momtune.report import build_report

from .conftest import Stored

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed")
CONSOLE_LINE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)?\]|Uncaught|ERROR:CONSOLE")
WIDTH, HEIGHT = 1280, 2000


def screenshot(page: Path, tmp: Path) -> tuple[Path, list[str]]:
    """Load a page, take a screenshot; returns (PNG path, console lines from stderr)."""
    shot = tmp / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
           f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return shot, [line for line in proc.stderr.splitlines() if CONSOLE_LINE.search(line)]


def _check_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 0, "no screenshot"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size == (WIDTH, HEIGHT)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, "the screenshot is blank"


def test_detector_sees_planted_errors(tmp_path: Path) -> None:
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><h1>bad</h1><script>console.error('planted error');"
                    "notAFunction();</script></body></html>")
    shot, console = screenshot(page, tmp_path)
    _check_png(shot)
    text = "\n".join(console)
    assert "planted error" in text and "Uncaught ReferenceError" in text, console


def test_report_loads_without_console_errors(stored: Stored, tmp_path: Path) -> None:
    out = tmp_path / "report"
    build_report(out, storage=stored.storage, library=stored.library, benches=[stored.bench])
    shot, console = screenshot(out / "report.html", tmp_path)
    assert console == [], "console messages:\n" + "\n".join(console)
    _check_png(shot)
