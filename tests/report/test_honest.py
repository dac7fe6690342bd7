"""What the report claims, it claims from the data (issue 13, item 6): floors name the peaks they
use (measured on which GPU, or nominal), a roofline per template, every time with its spread and
gains within noise not shown as wins, momtune labelled tuned only when a tuned library ran, and
full provenance (Python and fla too; "not recorded" for older data)."""
from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

import pytest

from momtune.report import Report, build_report

from .conftest import (GPU, NOISE_CASES, PEAKS, PROV_NEW, SHAPE_A, Stored, make_bench, make_noise_storage,
                       make_storage)

REPORT_SOURCES = sorted((Path(__file__).parents[2] / "momtune" / "report").glob("*.py")) + [
    Path(__file__).parents[2] / "momtune" / "commands" / "report.py"]


def _section(out: Path, heading: str) -> str:
    md = (out / "report.md").read_text(encoding="utf-8")
    return md.split(f"## {heading}")[1].split("\n## ")[0]


def _rates(p: dict[str, Any]) -> str:
    from momtune.report.fmt import num

    return f"{num(p['flops_per_s'] / 1e12)} TFLOP/s, {num(p['bytes_per_s'] / 1e12)} TB/s"


@pytest.fixture(scope="module")
def full(stored: Stored, tmp_path_factory: pytest.TempPathFactory) -> Report:
    out = tmp_path_factory.mktemp("honest") / "report"
    return build_report(out, storage=stored.storage, library=stored.library, benches=[stored.bench])


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Report:
    root = tmp_path_factory.mktemp("noisy")
    return build_report(root / "report", storage=make_noise_storage(root / "noise.db"))


# ---------------------------------------------------------------- gains and noise


def test_a_gain_within_noise_is_not_a_win(noisy: Report) -> None:
    """1.06x with ±8% spreads: the old report coloured every gain >= 1.05x green."""
    kernels = _section(noisy.out, "Kernels")
    page = (noisy.out / "report.html").read_text(encoding="utf-8")
    best, _, default, _ = NOISE_CASES[4096]
    row = next(line for line in kernels.splitlines() if line.startswith("| T=4096 "))
    assert f"{default / best:.2f}× within noise" in row and "| 10.0 ±8% | 10.6 ±7% |" in row
    assert f'<td class="r noise">{default / best:.2f}× within noise</td>' in page
    assert f'class="r good">{default / best:.2f}×' not in page
    # beyond noise (1.25x, ±1%): a win, green
    best, _, default, _ = NOISE_CASES[16384]
    assert f'<td class="r good">{default / best:.2f}×</td>' in page
    # the CLI table says the same
    from momtune.report.sections import summary_rows

    rows = {r[1].split()[1]: r for r in summary_rows(noisy.analysis)}
    assert rows["T=4096"][4] == f"{NOISE_CASES[4096][2] / NOISE_CASES[4096][0]:.2f}× within noise"
    assert rows["T=16384"][4] == "1.25×"


def test_a_kept_default_says_so(noisy: Report) -> None:
    kernels = _section(noisy.out, "Kernels")
    row = next(line for line in kernels.splitlines() if line.startswith("| T=8192 "))
    assert "`BLOCK=64 num_warps=8` — default kept" in row
    assert "within noise" in row  # 20.0 vs 20.0: the default against itself
    assert re.search(r"default kept: the search's fastest, `BLOCK=128 num_warps=4` \(19\.6 µs ±3%\), was within "
                     r"noise of the default config", kernels)


def test_spreads_next_to_times_and_a_bench_gain_within_noise(full: Report) -> None:
    e2e = _section(full.out, "End to end")
    row = next(line for line in e2e.splitlines() if "B=4 T=1024" in line)
    # momtune 2.00 ms (1.96-2.04: ±4%), fla 2.06 ms (2.01-2.10: ±4.4%): 1.03x is within noise
    assert "| 2.00 ±4% |" in row and "| 2.06 ±4.4% |" in row and "| 1.03× within noise |" in row
    page = (full.out / "report.html").read_text(encoding="utf-8")
    assert '<td class="r noise">1.03× within noise</td>' in page
    for heading in ("Kernels", "Search convergence", "Dispatch quality", "End to end"):
        assert "±" in _section(full.out, heading), heading


# ---------------------------------------------------------------- peaks and the roofline


def test_floors_name_the_measured_peaks(full: Report) -> None:
    text = f"measured on {GPU}: {_rates(PEAKS)}"
    assert text in _section(full.out, "Kernels").split("###")[0]
    prov = _section(full.out, "Provenance")
    peaks_row = next(line for line in prov.splitlines() if line.startswith("| floor peaks "))
    assert peaks_row.count(text) == 2 and "not recorded" in peaks_row  # studies, library; the old bench
    assert "nominal" not in (full.out / "report.md").read_text(encoding="utf-8")


def test_nominal_peaks_are_labelled(tmp_path: Path) -> None:
    from momtune.timing import NOMINAL_PEAKS

    out = tmp_path / "r"
    build_report(out, storage=make_storage(tmp_path / "interp.db", interpreter=True))
    md = (out / "report.md").read_text(encoding="utf-8")
    text = f"nominal {NOMINAL_PEAKS['gpu']} peaks, not measured: {_rates(NOMINAL_PEAKS)}"
    assert "Some floors use nominal peaks, not ones measured where the kernels ran" in md.split("## Provenance")[0]
    assert text in _section(out, "Kernels") and text in _section(out, "Provenance")
    assert "measured on" not in md.replace("not measured on", "")


def test_no_peak_numbers_in_the_report_code() -> None:
    for path in REPORT_SOURCES:
        text = path.read_text(encoding="utf-8")
        for pattern in (r"685", r"3\.0e12", r"3e12", r"H100"):
            assert not re.search(pattern, text), f"{path.name}: {pattern}"


def test_a_roofline_per_template(full: Report, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    from momtune.kernels import get_template
    from momtune.report import plots

    manifest = json.loads((full.out / "momtune-report.json").read_text(encoding="utf-8"))["files"]
    page = (full.out / "report.html").read_text(encoding="utf-8")
    md = (full.out / "report.md").read_text(encoding="utf-8")
    for tpl in ("recurrence", "merge"):
        name = f"roofline_{tpl}.png"
        assert (full.out / name).read_bytes()[:4] == b"\x89PNG" and name in manifest
        assert f'alt="{tpl} roofline"' in page and f"![{tpl} roofline]({name})" in md
    assert "FLOPs and bytes per call from the template's cost model" in md
    # what is drawn: the peaks recorded by the search, points from the template's cost and the times
    drawn: dict[str, tuple[list[Any], list[Any]]] = {}

    def capture(path: Path, title: str, points: list[Any], peaks: list[Any], labels: list[str]) -> None:
        drawn[title.split(":")[0]] = (list(points), list(peaks))
        path.write_bytes(b"\x89PNG\r\n\x1a\n")

    monkeypatch.setattr(plots, "roofline", capture)
    build_report(tmp_path / "r", storage=full.analysis.inputs.storage, library=full.analysis.inputs.library.path)
    points, peaks = drawn["recurrence"]
    assert [(p["flops_per_s"], p["bytes_per_s"], p["measured"]) for p in peaks] == [
        (PEAKS["flops_per_s"], PEAKS["bytes_per_s"], True)]
    flops, nbytes = get_template("recurrence").cost(SHAPE_A, torch.bfloat16)
    tuned = next(p for p in points if p.shape == "N=16384" and p.impl == "tuned")
    assert tuned.ms == 0.040 and tuned.intensity == pytest.approx(flops / nbytes)
    assert tuned.flops_per_s == pytest.approx(flops / 0.040e-3)
    assert {p.impl for p in points} == {"tuned", "default"}


# ---------------------------------------------------------------- honest labels


def _e2e_labels(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, str]]:
    from momtune.report import plots

    seen: dict[str, dict[str, str]] = {}
    real = plots.grouped_bars

    def capture(path: Path, title: str, labels: Any, series: Any, names: Any, xlabel: str = "time") -> None:
        seen[path.name] = dict(names)
        real(path, title, labels, series, names, xlabel)

    monkeypatch.setattr(plots, "grouped_bars", capture)
    return seen


def test_a_defaults_bench_is_not_labelled_tuned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = make_bench(tmp_path / "defaults.json", library=None, prov=PROV_NEW)
    data = json.loads(bench.read_text())
    data["rows"].append({"kind": "kernel", "name": "recurrence", "shape": SHAPE_A, "dtype": "bfloat16",
                         "impl": "momtune", "ms": 0.05})
    bench.write_text(json.dumps(data))
    seen = _e2e_labels(monkeypatch)
    out = tmp_path / "r"
    build_report(out, benches=[bench])
    e2e = _section(out, "End to end")
    assert seen["end_to_end.png"]["momtune"] == "momtune (default configs)"
    rows = [line for line in e2e.splitlines() if line.startswith(("| layer_", "| model_"))]
    assert len(rows) == 4 and all("| default configs |" in line and "tuned" not in line for line in rows)
    assert "momtune tuned" not in e2e
    assert "momtune ran with each template's default config (no tuned library)" in e2e
    assert "momtune (default configs)" in e2e  # the chart's caption
    prov = _section(out, "Provenance")
    assert "| momtune ran with | each template's default config (no tuned library) |" in prov
    # its kernel row is a default-config time, not a tuned one
    row = next(line for line in _section(out, "Kernels").splitlines() if line.startswith("| N=16384"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("—") and cells[2] == "50.0²"  # tuned: none; default: 50 µs (no spread recorded)


def test_a_tuned_bench_is_labelled_tuned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = make_bench(tmp_path / "tuned.json", library="/opt/libs/library-h100.json", prov=PROV_NEW)
    seen = _e2e_labels(monkeypatch)
    out = tmp_path / "r"
    build_report(out, benches=[bench])
    assert seen["end_to_end.png"]["momtune"] == "momtune (tuned library)"
    assert "| tuned library |" in _section(out, "End to end")
    assert "| momtune ran with | tuned library `library-h100.json` |" in _section(out, "Provenance")


def test_fla_is_labelled_with_its_recorded_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _e2e_labels(monkeypatch)
    build_report(tmp_path / "r", benches=[make_bench(tmp_path / "b.json", library=None,
                                                       prov={**PROV_NEW, "fla": "0.7.1"})])
    assert seen["end_to_end.png"]["fla"] == "fla 0.7.1"
    seen.clear()
    build_report(tmp_path / "r2", benches=[make_bench(tmp_path / "old.json")])  # no version recorded
    assert seen["end_to_end.png"]["fla"] == "fla"


# ---------------------------------------------------------------- provenance


def test_provenance_rows_hold_python_and_fla(full: Report) -> None:
    prov = _section(full.out, "Provenance")
    assert "|  | studies (5) | library library.json | bench bench.json |" in prov
    # studies and library record them; the bench file is an older one: "not recorded"
    assert "| Python | 3.12.3 | 3.12.3 | not recorded |" in prov
    assert "| fla | 0.6.0 | 0.6.0 | not recorded |" in prov
    for key in ("GPU", "driver", "torch", "Triton", "commit", "floor peaks"):
        assert f"| {key} |" in prov, key


def test_older_studies_say_not_recorded(tmp_path: Path) -> None:
    out = tmp_path / "r"
    build_report(out, storage=make_storage(tmp_path / "old.db", old=True))
    prov = _section(out, "Provenance")
    for key in ("Python", "fla", "floor peaks"):
        assert f"| {key} | not recorded |" in prov, key
    kernels = _section(out, "Kernels")
    assert "no spread recorded for this time" in kernels
    assert "no roofs: the peaks of these floors were not recorded" in kernels


def test_collect_records_python_and_fla(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    from momtune import provenance

    prov = provenance.collect()
    assert prov["python"] == platform.python_version()
    try:
        expected = metadata.version("flash-linear-attention")
    except metadata.PackageNotFoundError:
        expected = "not installed"
    assert prov["fla"] == expected

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert provenance.collect()["fla"] == "not installed"


def test_export_keeps_python_fla_and_the_peaks(stored: Stored, tmp_path: Path) -> None:
    from momtune.library import atomic_write_json, build_library, load_library

    lib = build_library(stored.storage, prefix="*", note=lambda _: None)
    assert lib["provenance"]["python"] == "3.12.3" and lib["provenance"]["fla"] == "0.6.0"
    assert lib["provenance"]["floor_peak"] == PEAKS
    atomic_write_json(tmp_path / "lib.json", lib)
    assert load_library(tmp_path / "lib.json").unknown == []


@pytest.mark.parametrize("prov,configs", [
    ({}, "not recorded"),  # predates the key
    ({"momtune_library": "auto"}, "not recorded"),  # older files recorded the setting, not what it resolved to
    ({"momtune_library": None}, "defaults"),
    ({"momtune_library": "none"}, "defaults"),
    ({"momtune_library": "/data/library-h200.json"}, "tuned"),
])
def test_which_configs_a_bench_ran(prov: dict[str, Any], configs: str) -> None:
    from momtune.report.collect import bench_configs

    assert bench_configs(prov) == configs
