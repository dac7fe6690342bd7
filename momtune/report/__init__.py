"""``momtune report``: a Markdown + self-contained HTML report (with PNG figures) rebuilt from
stored Optuna studies, a tuned library, bench files and training runs alone — nothing is re-run. It claims only
what the data records: which peaks each floor uses, every time with its spread (a gain within
noise is not a win), which configs a bench ran (tuned library or defaults), and the provenance
(Python, torch, Triton, fla, driver, GPU, commit) of every input, "not recorded" where absent.

    collect.py         read studies / library / bench JSON into plain data (docs/DATA_FORMATS.md)
    trainrun.py        read a training run's JSON (bench/gpu_train_run.py --out)
    analyze.py         derived tables: kernel times, convergence, failures, end to end
    dispatch_view.py   the dispatch quality tables (library picks and held-out shapes)
    peaks.py           the peaks the floors use (measured or nominal, as recorded); roofline points
    fmt.py             numbers: times with their spread, gains judged against noise (timing.judge)
    plots.py           matplotlib figures (Agg, PNG)
    doc.py, sections*.py  the document and its sections as blocks (sections_train.py: the training run)
    render.py          blocks -> Markdown and one HTML page (inline CSS, base64 PNGs, no script)

    folder.py          the output folder: built whole next to ``--out``, then swapped in

The report is written atomically (folder.py): the whole folder is built next to the output
folder with a manifest of its files, then swapped in with one atomic exchange, so a kill leaves
the old report or the new one. A folder holding files momtune did not write is replaced only
with ``force``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from momtune.errors import ReportError

if TYPE_CHECKING:
    from .analyze import Analysis
    from .collect import Library

__all__ = ["Report", "build_report"]


@dataclass
class Report:
    out: Path
    files: list[Path]
    title: str
    analysis: Analysis


def build_report(out: str | Path, storage: str | None = None, library: str | Path | None = None,
                 benches: Sequence[str | Path] = (), title: str | None = None, storage_required: bool = True,
                 dispatcher_factory: Callable[[Library], Any] | None = None, force: bool = False,
                 train_runs: Sequence[str | Path] = (), gpu: str | None = None) -> Report:
    """Read the inputs, write ``out/report.md``, ``out/report.html``, ``out/*.png`` and the manifest.

    ``gpu``: only the studies of that GPU (its name or slug, e.g. "NVIDIA H200"; the others are
    left out with a warning). Raises ReportError for unreadable or wrong inputs, when there is nothing to report on, when
    ``out`` is a file, holds an input or the working folder, or (unless ``force``) holds files
    momtune did not write; on any error an existing report in ``out`` is left untouched.
    """
    from momtune import __version__

    from . import render, sections
    from .analyze import analyze
    from .collect import collect
    from .folder import write_folder
    from .trainrun import load_train_run

    out = Path(os.path.abspath(out))
    _check_out(out, storage, library, benches, train_runs)
    runs = [load_train_run(t) for t in train_runs]  # bad arguments fail before the slow part
    inputs = collect(storage, library, benches, storage_required=storage_required, train_runs=runs, gpu=gpu)
    analysis = analyze(inputs, dispatcher_factory)
    built = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    titles: list[str] = []

    def build(tmp: Path) -> list[str]:
        subtitle, doc = sections.build(analysis, tmp, built, __version__)
        titles.append(title or sections.default_title(analysis))
        blocks = [render.Para(subtitle, "sub"), *doc.blocks]
        (tmp / "report.md").write_text(render.to_markdown(titles[0], blocks), encoding="utf-8")
        footer = (f"momtune {__version__} · built {built} · figures: "
                  + ", ".join(f"`{p}`" for p in doc.pngs) if doc.pngs else f"momtune {__version__} · built {built}")
        (tmp / "report.html").write_text(render.to_html(titles[0], subtitle, doc.blocks, tmp, footer),
                                         encoding="utf-8")
        return [*doc.pngs, "report.md", "report.html"]

    names = write_folder(out, build, force, {"momtune": __version__, "built": built})
    return Report(out, [out / n for n in names], titles[0], analysis)


def _check_out(out: Path, storage: str | None, library: str | Path | None, benches: Sequence[str | Path],
               train_runs: Sequence[str | Path] = ()) -> None:
    """``out`` is replaced whole: it must not be, or hold, the working folder or an input."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a folder; give a folder for the report")
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ReportError(f"--out {out}: is the working folder or holds it; a report replaces its whole folder, "
                          "so give a folder of its own (e.g. --out report)")
    from momtune.study import sqlite_path

    db = sqlite_path(storage) if storage else None
    for what, path in [("--storage", db), ("--library", library), *(("--bench", b) for b in benches),
                       *(("--train-run", t) for t in train_runs)]:
        if path is not None and real in Path(os.path.abspath(path)).resolve().parents:
            raise ReportError(f"--out {out}: holds {what} {path}; a report replaces its whole folder, so give a "
                              "folder of its own")
