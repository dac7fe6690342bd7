"""Partial and bad inputs, atomic writes, the interpreter banner and the small rules."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from momtune.errors import ReportError
from momtune.report import build_report

from .conftest import SHAPE_A, SHAPE_B, Stored, make_bench, make_storage


def _missing_section(out: Path) -> str:
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Missing inputs" in md
    return md.split("## Missing inputs")[1].split("\n## ")[0]


def test_studies_only_lists_missing_library_and_bench(stored: Stored, tmp_path: Path) -> None:
    out = tmp_path / "r"
    build_report(out, storage=stored.storage)
    missing = _missing_section(out)
    assert "**tuned library**" in missing and "`momtune export" in missing
    assert "**bench file**" in missing and "`momtune bench --out bench.json`" in missing
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "No library given, so no dispatch view" in md
    assert "No layer or model rows" in md
    assert (out / "report.html").stat().st_size > 10_000


def test_bench_without_fla_rows(stored: Stored, tmp_path: Path) -> None:
    bench = make_bench(tmp_path / "nofla.json", fla=False)
    out = tmp_path / "r"
    build_report(out, storage=stored.storage, library=stored.library, benches=[bench])
    missing = _missing_section(out)
    assert "**fla kernel rows**" in missing and "flash-linear-attention 0.6.0" in missing
    assert "tuned library" not in missing and "**bench file**" not in missing


def test_bench_only(stored: Stored, tmp_path: Path) -> None:
    out = tmp_path / "r"
    build_report(out, storage=None, benches=[stored.bench])
    missing = _missing_section(out)
    assert "**Optuna studies**" in missing and "`momtune search" in missing
    assert "model_decode" in (out / "report.md").read_text(encoding="utf-8")


def test_empty_storage_and_no_bench_is_an_error(tmp_path: Path) -> None:
    import optuna

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.storages.RDBStorage(url)  # creates the tables, no study
    with pytest.raises(ReportError, match="nothing to report.*holds no momtune studies"):
        build_report(tmp_path / "r", storage=url)
    assert not (tmp_path / "r").exists()


def test_missing_sqlite_file_is_an_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nope.db'}"
    with pytest.raises(ReportError, match="nope.db does not exist"):
        build_report(tmp_path / "r", storage=url)
    assert not (tmp_path / "nope.db").exists()


@pytest.mark.parametrize("case", ["nonexistent", "not-json", "wrong-schema", "bad-row"])
def test_bad_bench_file_names_the_file(stored: Stored, tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.json"
    if case == "not-json":
        path.write_text("{not json")
    elif case == "wrong-schema":
        path.write_text(json.dumps({"schema": "momtune.library/1", "rows": []}))
    elif case == "bad-row":
        path.write_text(json.dumps({"schema": "momtune.bench/1", "rows": [{"kind": "kernel", "name": "x"}]}))
    with pytest.raises(ReportError, match=str(path).replace(".", r"\.")):
        build_report(tmp_path / "r", storage=stored.storage, benches=[path])


def test_bad_library_names_the_file(stored: Stored, tmp_path: Path) -> None:
    path = tmp_path / "lib.json"
    path.write_text(json.dumps({"schema": "momtune.bench/1"}))
    with pytest.raises(ReportError, match=r"library .*lib\.json: schema"):
        build_report(tmp_path / "r", storage=stored.storage, library=path)


def test_cli_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from momtune.cli import main

    rc = main(["report", "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--bench", str(tmp_path / "b.json"),
               "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "b.json: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["html", "plot"])
def test_failure_midway_leaves_existing_report_untouched(stored: Stored, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    out = tmp_path / "r"
    build_report(out, storage=stored.storage, benches=[stored.bench])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("renderer failed midway")

    if stage == "html":  # after every PNG and report.md were written to the temp folder
        monkeypatch.setattr("momtune.report.render.to_html", boom)
    else:
        monkeypatch.setattr("momtune.report.plots.importance", boom)
    with pytest.raises(RuntimeError, match="midway"):
        build_report(out, storage=stored.storage, library=stored.library, benches=[stored.bench], title="new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"], "temp folder left behind"


def test_interpreter_banner(tmp_path: Path) -> None:
    url = make_storage(tmp_path / "interp.db", interpreter=True)
    out = tmp_path / "r"
    build_report(out, storage=url)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "interpreter timings — not GPU performance" in md.split("## Provenance")[0]
    assert "interpreter timings — not GPU performance" in (out / "report.html").read_text(encoding="utf-8")


def test_local_dispatch_rule_when_dispatcher_missing(stored: Stored, tmp_path: Path) -> None:
    def no_dispatcher(library: object) -> object:
        raise ImportError("no momtune.dispatch")

    rep = build_report(tmp_path / "r", storage=stored.storage, library=stored.library, benches=[stored.bench],
                       dispatcher_factory=no_dispatcher)
    a = rep.analysis
    assert "local copy" in a.dispatch_method
    picks = {r.sid.shape: (r.source, r.config) for r in a.dispatch if r.sid.template == "recurrence"}
    assert picks[tuple(SHAPE_A.items())] == ("exact", {"BT": 32, "BV": 64, "num_warps": 4})


def test_nearest_rule() -> None:
    from momtune.report.collect import log_distance, nearest

    near = {**SHAPE_A, "N": 20000}
    cands = [(SHAPE_A, "a"), (SHAPE_B, "b"), ({**SHAPE_A, "H": 8}, "other heads")]
    assert nearest(cands, near)[0] == "a"
    assert nearest(cands, {**SHAPE_B, "N": 30000})[0] == "b"
    assert nearest(cands, {**SHAPE_A, "H": 2}) is None  # a non-size key differs everywhere
    assert log_distance(SHAPE_A, SHAPE_B) == pytest.approx(math.log(2))
    assert log_distance(SHAPE_A, {**SHAPE_A, "K": 128}) == math.inf


def test_eta_squared_ranks_the_parameter_that_matters() -> None:
    from momtune.report.studies import eta_squared

    points = [({"a": a, "b": b}, (1.0 if a == 0 else 3.0) * (1.01 if b else 1.0)) for a in (0, 1) for b in (0, 1)
              for _ in range(3)]
    imp = eta_squared(points, ["a", "b"])
    assert list(imp) == ["a", "b"] and imp["a"] > 0.99 and sum(imp.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("done,expect", [(56, True), (24, False)])
def test_exhaustive_only_when_every_config_ran(done: int, expect: bool) -> None:
    """A study meant to be exhaustive that a time limit cut short (24 of 56 on the H100) is not
    an optimum: the report treats it as an ordinary grid study."""
    from momtune.report.collect import Study, Trial

    trials = [Trial(i, "COMPLETE", "ok", {"X": i}, 1.0 + i) for i in range(done)]
    trials += [Trial(done + i, "RUNNING", "", {}, None) for i in range(8 if done < 56 else 0)]
    s = Study("exhaustive/recurrence:h100:N1", "recurrence", {"N": 1}, "bfloat16", "h100", False, "grid", 56,
              {}, {}, None, None, None, trials)
    assert s.exhaustive is expect


def test_gpu_keeps_one_gpu_s_studies_of_a_mixed_storage(tmp_path: Path) -> None:
    """Session 13's committed database holds the H200's studies and 13 older H100 ones: ``--gpu``
    reports on one GPU (the others are left out, said so); a GPU the storage lacks is an error
    naming the GPUs it holds."""
    import gzip
    import shutil

    from momtune.report.collect import collect

    db = tmp_path / "s13.db"
    src = Path(__file__).resolve().parents[2] / "docs/perf/data/momtune-h200-2026-11-29-s13.db.gz"
    with gzip.open(src, "rb") as f, open(db, "wb") as g:
        shutil.copyfileobj(f, g)
    url = f"sqlite:///{db}"
    assert {s.gpu for s in collect(url).studies} == {"NVIDIA H200", "NVIDIA H100 80GB HBM3"}
    inputs = collect(url, gpu="NVIDIA H200")
    assert {s.gpu for s in inputs.studies} == {"NVIDIA H200"} and len(inputs.studies) == 25
    assert any("13 studies of NVIDIA H100 80GB HBM3 left out" in w for w in inputs.warnings)
    assert len(collect(url, gpu="nvidia-h100-80gb-hbm3").studies) == 13  # the slug names it too
    with pytest.raises(ReportError, match="--gpu 'A100'.*NVIDIA H100 80GB HBM3, NVIDIA H200"):
        collect(url, gpu="A100")
