"""momtune report: Markdown + self-contained HTML report (with PNGs) from stored studies, a
tuned library, bench files and training runs; nothing is re-run and no GPU is needed."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="build a Markdown + HTML report from stored studies, a library and bench files",
        description="Rebuild a report (report.md, report.html with embedded figures, *.png) from Optuna "
                    "studies, a tuned library and bench files alone: kernel times vs default / fla / "
                    "reference with their spread (a gain within noise is not shown as a win), floors and a "
                    "roofline per template from the peaks the studies recorded (measured on the GPU, or "
                    "nominal, said which), search convergence, parameter importance, dispatch quality, "
                    "failures, end-to-end numbers labelled with the configs the bench ran (tuned library or "
                    "defaults), a training run's loss curves on momtune's kernels against the reference (as "
                    "recorded) and every input's provenance. Missing inputs are listed in the report with "
                    "the command that produces them.",
    )
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage URL with the studies of `momtune search` (default: MOMTUNE_STORAGE, "
                        "sqlite:///momtune.db)")
    p.add_argument("--library", metavar="FILE", help="tuned library JSON from `momtune export`")
    p.add_argument("--bench", metavar="FILE", nargs="+", action="extend", default=[],
                   help="bench JSON files from `momtune bench --out FILE` (repeatable)")
    p.add_argument("--train-run", metavar="FILE", nargs="+", action="extend", default=[], dest="train_run",
                   help="a training run's JSON from `python3 bench/gpu_train_run.py --out FILE` on a GPU: its loss "
                        "curves on momtune's kernels and on the reference, recall, step times and whether the "
                        "curves agree, as recorded (repeatable)")
    p.add_argument("--gpu", metavar="NAME",
                   help="only the studies of this GPU (e.g. 'NVIDIA H200'; a storage may hold several GPUs' "
                        "studies: the others are left out, and the report says how many)")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="output folder: the report is built whole next to it and swapped in atomically (a kill "
                        "leaves the old report or the new one); a folder holding files momtune did not write "
                        "needs --force")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it holds files momtune did not write (they are deleted)")
    p.add_argument("--title", metavar="T", help="report title (default: names the GPU and dtype)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from momtune.report import build_report
    from momtune.report.sections import summary_rows
    from momtune.settings import load

    storage = args.storage or load().storage
    report = build_report(args.out, storage=storage, library=args.library, benches=args.bench,
                          title=args.title, storage_required=args.storage is not None, force=args.force,
                          train_runs=args.train_run, gpu=args.gpu)
    a = report.analysis
    console = Console()
    if a.interpreter:
        console.print("[bold yellow]⚠ interpreter timings — not GPU performance[/]")
    table = Table(title=report.title)
    for col, just in (("template", "left"), ("shape", "left"), ("tuned", "right"), ("default", "right"),
                      ("speed-up", "right"), ("fla", "right"), ("vs fla", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in summary_rows(a):
        table.add_row(*row)
    console.print(table)
    floors = [k.floor_peak for k in a.kernels if k.floor_ms is not None]
    if floors:
        from momtune.report.peaks import peaks_summary, valid_peak

        console.print("floors use the peaks " + peaks_summary(floors, sum(valid_peak(p) is None for p in floors)),
                      markup=False)
    from momtune.report.sections_train import summary_line

    for t in a.inputs.train_runs:
        console.print(summary_line(t), markup=False)
    for m in a.missing:
        console.print(f"[yellow]missing[/] {m.what}: {m.effect} — {m.how}")
    console.print(f"wrote {', '.join(str(f) for f in report.files)}")
    return 0
