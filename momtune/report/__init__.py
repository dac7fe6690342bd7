"""``momtune report``: a Markdown + self-contained HTML report (with PNG figures) rebuilt from
stored Optuna studies, a tuned library and bench files alone — nothing is re-run.

    collect.py         read studies / library / bench JSON into plain data (docs/DATA_FORMATS.md)
    analyze.py         derived tables: kernel times, convergence, dispatch, failures, end to end
    plots.py           matplotlib figures (Agg, PNG)
    sections*.py       the report's sections as document blocks
    render.py          blocks -> Markdown and one HTML page (inline CSS, base64 PNGs, no script)

The report is written atomically: everything is built in a temporary folder next to the output
folder, then moved in file by file with ``os.replace`` (report.html last).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from momtune.errors import ReportError

if TYPE_CHECKING:
    from .analyze import Analysis
    from .collect import Library

__all__ = ["Report", "build_report"]
FIGURE_PREFIXES = ("kernels_", "convergence_", "importance_", "end_to_end")


@dataclass
class Report:
    out: Path
    files: list[Path]
    title: str
    analysis: "Analysis"


def build_report(out: str | Path, storage: str | None = None, library: str | Path | None = None,
                 benches: Sequence[str | Path] = (), title: str | None = None, storage_required: bool = True,
                 dispatcher_factory: Callable[["Library"], Any] | None = None) -> Report:
    """Read the inputs, write ``out/report.md``, ``out/report.html`` and ``out/*.png``.

    Raises ReportError for unreadable or wrong inputs and when there is nothing to report on;
    on any error an existing report in ``out`` is left untouched.
    """
    from momtune import __version__

    from . import render, sections
    from .analyze import analyze
    from .collect import collect

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a folder")
    inputs = collect(storage, library, benches, storage_required=storage_required)
    analysis = analyze(inputs, dispatcher_factory)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise ReportError(f"--out {out}: cannot create a folder next to it ({exc})") from exc
    try:
        built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        subtitle, doc = sections.build(analysis, tmp, built, __version__)
        title = title or sections.default_title(analysis)
        blocks = [render.Para(subtitle, "sub"), *doc.blocks]
        (tmp / "report.md").write_text(render.to_markdown(title, blocks), encoding="utf-8")
        footer = (f"momtune {__version__} · built {built} · figures: "
                  + ", ".join(f"`{p}`" for p in doc.pngs) if doc.pngs else f"momtune {__version__} · built {built}")
        (tmp / "report.html").write_text(render.to_html(title, subtitle, doc.blocks, tmp, footer), encoding="utf-8")
        names = [*doc.pngs, "report.md", "report.html"]
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in out.glob("*.png"):
        if stale.name.startswith(FIGURE_PREFIXES) and stale.name not in names:
            stale.unlink(missing_ok=True)
    return Report(out, [out / n for n in names], title, analysis)
