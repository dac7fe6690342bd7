"""The full report from a storage, a library and a bench file: numbers, figures, HTML."""
from __future__ import annotations

import base64
import re
from collections import Counter
from pathlib import Path

import pytest

from momtune.report import Report, build_report

from .conftest import PEAKS, SHAPE_A, SHAPE_B, Stored, floor_of

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(stored: Stored, tmp_path_factory: pytest.TempPathFactory) -> Report:
    out = tmp_path_factory.mktemp("full") / "report"
    return build_report(out, storage=stored.storage, library=stored.library, benches=[stored.bench])


def _md(report: Report) -> str:
    return (report.out / "report.md").read_text(encoding="utf-8")


_TAIL = r"(?: ±[\d.]+%)?[¹²³⁴⁵⁶⁷⁸⁹,]*(?= \|)"  # a cell may end in its spread and footnote marks


def _row(md: str, *cells: str) -> str:
    """The Markdown table row that holds all these cells (in this order; a cell's text may go on
    with its spread, " ±x%", and footnote marks)."""
    pattern = r"[^\n]*".join(re.escape(f"| {c}") + _TAIL for c in cells)
    m = re.search(r"^[^\n]*" + pattern + r"[^\n]*$", md, re.MULTILINE)
    assert m, f"no table row with {cells!r} in report.md"
    return m.group(0)


def test_files_written(report: Report) -> None:
    names = sorted(p.name for p in report.out.iterdir())
    for expected in ("report.md", "report.html", "kernels_recurrence.png", "convergence_recurrence.png",
                     "convergence_merge.png", "importance_recurrence.png", "end_to_end.png"):
        assert expected in names
    assert [p.name for p in report.out.parent.iterdir()] == ["report"], "temp dir left"


def test_provenance_and_title(report: Report) -> None:
    md = _md(report)
    assert md.startswith("# momtune report — NVIDIA H100 80GB HBM3 · bfloat16")
    for value in ("550.54.15", "12.4", "2.6.0", "3.6.0", "abc123def456"):
        assert value in md.split("## Kernels")[0]
    assert "interpreter timings" not in md


def test_kernel_numbers(report: Report) -> None:
    md = _md(report)
    # shape A: library 0.040 ms tuned vs 0.100 default = 2.50x; fla 0.060 -> 1.50x; reference 2.0 ms -> 50x;
    # the floor from the template's cost and the measured peaks
    floor = floor_of("recurrence", SHAPE_A, PEAKS) / 0.040
    row = _row(md, "N=16384", "40.0", "100", "60.0", "2000", "2.50×", "1.50×", "50.00×", f"{floor * 100:.0f}%")
    assert "BT=32 BV=64 num_warps=4" in row
    # every time with its recorded spread: the winner's re-timing (1%), the default as a candidate
    # of it (1.5%), the bench rows' min-max ((0.062 - 0.059) / 0.060 = 5%, (2.1 - 1.95) / 2 = 7.5%)
    assert "| 40.0 ±1% | 100 ±1.5% | 60.0 ±5% | 2000 ±7.5% |" in row
    # shape B: 0.104 / 0.080 = 1.30x; fla refused (null with a note) -> a dash with its footnote; the
    # library's config was never timed by a study: no spread recorded, said in a footnote
    row_b = _row(md, "N=32768", "80.0", "104", "1.30×")
    assert "| 80.0¹ |" in row_b and "—²" in row_b  # fla: the bench row says why it has no time
    section = md.split("### recurrence")[1].split("\n## ")[0]
    assert "¹ no spread recorded for this time" in section
    assert "² fla: fla chunk kernel refuses this shape (bench.json)" in section  # the file records no fla version
    assert "fla time: kernel rows for impl fla in a bench file" in md.split("### merge")[1]
    assert "all recurrence shapes have S=40 H=4 K=64 V=64." in md
    assert floor_of("recurrence", SHAPE_B, PEAKS) > 0


def test_convergence_samplers_and_exhaustive(report: Report) -> None:
    md = _md(report)
    section = md.split("## Search convergence")[1].split("## Parameter importance")[0]
    for sampler in ("tpe", "random", "exhaustive"):
        assert re.search(rf"\| N=16384 \| {sampler} \| ", section), sampler
    # exhaustive study: 27 configs (1 pruned invalid one), best 40.0 us
    _row(section, "N=16384", "exhaustive", "27")
    assert "convergence_recurrence.png" in section


def test_importance(report: Report) -> None:
    md = _md(report)
    section = md.split("## Parameter importance")[1].split("## Dispatch quality")[0]
    assert "not enough trials" in _row(section, "merge")
    row = _row(section, "N=16384", "exhaustive")
    assert re.search(r"BT \d\.\d\d", row) and "num_warps" in row
    assert "importance_recurrence.png" in section


def test_dispatch_and_held_out(report: Report) -> None:
    md = _md(report)
    section = md.split("## Dispatch quality")[1].split("## Failures")[0]
    assert "exact" in _row(section, "N=16384", "40.0", "40.0", "1.00×")
    assert "| 40.0 ±1.2% | 40.0 ±1.2% |" in _row(section, "N=16384", "exact")  # the trials' spreads
    held = section.split("### Held-out shapes")[1]
    # A gets B's winner (BT=64 BV=64 w4): measured 0.040 * 1.15 = 0.046 ms on A -> 1.15x of A's best
    row = _row(held, "N=16384", "N=32768")
    assert "BT=64 BV=64 num_warps=4" in row and "46.0" in row and "1.15×" in row


def test_failure_counts_match_storage(report: Report, stored: Stored) -> None:
    import optuna

    expected: Counter[str] = Counter()
    for s in optuna.get_all_study_summaries(stored.storage):
        if s.user_attrs.get("template") == "recurrence":
            for t in optuna.load_study(study_name=s.study_name, storage=stored.storage).get_trials():
                expected[t.user_attrs["status"]] += 1
    md = _md(report)
    section = md.split("## Failures")[1].split("## End to end")[0]
    header = next(line for line in section.splitlines() if line.startswith("| template"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = [c.strip() for c in _row(section, "recurrence").strip("|").split("|")]
    got = dict(zip(cols, row))
    for status, n in expected.items():
        assert got[status] == str(n), (status, got)
    assert got["total"] == str(sum(expected.values()))
    assert "out of resource: shared memory" in section


def test_end_to_end(report: Report) -> None:
    md = _md(report)
    section = md.split("## End to end")[1]
    # model decode: momtune 5.0 ms, fla 7.5 ms (1.50x), reference 50 ms (10x), each ± its min-max spread
    row = _row(section, "model_decode", "mom-340m", "B=1", "5.00", "7.50", "50.0", "1.50×", "10.00×")
    assert "| 5.00 ±4% |" in row and "| 7.50 ±6.7% |" in row
    # layer prefill: fla faster (1.0 vs 1.2 ms -> 0.83x), default 1.5 ms (1.25x)
    _row(section, "layer_prefill", "B=1 T=4096", "1.20", "1.50", "1.00", "1.25×", "0.83×")
    # layer decode: the reference failed (no time, a note) -> a dash whose footnote gives the reason;
    # momtune's CUDA-graph time (0.2 ms) is noted with its ratio to fla (0.3 ms)
    assert "—" in _row(section, "layer_decode", "B=8", "0.500", "0.300", "0.60×")
    assert "PyTorch reference: failed: CUDA out of memory (bench.json)" in section
    assert "momtune in a CUDA graph takes 200 µs per call (1.50× vs fla)" in section
    assert "end_to_end.png" in section
    assert "| momtune ran | momtune (ms) | default (ms) | fla (ms) |" in section
    # the test's bench file predates the `momtune_library` provenance key: the report says so, in
    # every row and in the chart's label, and calls nothing "tuned"
    assert "bench.json: the bench file does not record which configs momtune ran with" in section
    assert "| not recorded | 5.00" in row
    assert "momtune (configs not recorded)" in section and "tuned" not in section.replace("tuned library", "")


def test_pngs_are_valid_images(report: Report) -> None:
    from matplotlib.image import imread
    from PIL import Image

    pngs = sorted(report.out.glob("*.png"))
    assert len(pngs) >= 5
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE, p.name
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 150, (p.name, im.size)
        assert imread(p).ndim == 3


def test_html_is_self_contained(report: Report) -> None:
    page = (report.out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", page, re.IGNORECASE), "external resource"
    assert not re.search(r"url\(\s*[\"']?(?:https?:)?//", page, re.IGNORECASE) and "@import" not in page
    srcs = re.findall(r"src=\"([^\"]+)\"", page)
    assert len(srcs) == len(list(report.out.glob("*.png")))
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_SIGNATURE
    assert all(h.startswith("#") for h in re.findall(r"href=\"([^\"]+)\"", page))
    # the same numbers as the Markdown, with colored speed-ups
    assert '<td class="r good">2.50×</td>' in page
    assert '<td class="r bad">0.83×</td>' in page


def test_cli(stored: Stored, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from momtune.cli import main

    out = tmp_path / "cli"
    rc = main(["report", "--storage", stored.storage, "--library", str(stored.library), "--bench",
               str(stored.bench), "--out", str(out), "--title", "My run"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "My run" in text and "2.50×" in text and "report.html" in text
    assert (out / "report.md").read_text(encoding="utf-8").startswith("# My run\n")
    assert "<title>My run</title>" in (out / "report.html").read_text(encoding="utf-8")
