"""What the command line prints, for people and for scripts (issue 13, item 5): --json on list and
search (results on stdout, progress on stderr), nothing cut when piped, study k of n with elapsed
time and ETA on every trial line, the stop reason of each study, -q and -v."""
from __future__ import annotations

import json
import re

import pytest

from momtune.cli import main
from momtune.kernels import TEMPLATE_MODULES

from .conftest import FAKE, SPACES


def test_list_json_has_every_template_with_its_shape_sets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {t["template"] for t in data["templates"]} == set(TEMPLATE_MODULES)
    rec = next(t for t in data["templates"] if t["template"] == "recurrence")
    assert "mom-340m-prefill" in rec["shape_sets"] and "SOLVE" in rec["parameters"]
    assert {p["preset"] for p in data["presets"]} >= {"mom-340m", "mom-1.3b"}


def test_list_piped_prints_whole_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0  # capsys is not a terminal, as a pipe
    out = capsys.readouterr().out
    rows = [line.split("\t") for line in out.splitlines() if not line.startswith("#")]
    assert rows[0] == ["template", "module", "search_space", "parameters", "shape_sets"]
    rec = next(r for r in rows if r[0] == "recurrence")
    assert rec[1] == "momtune.kernels." + TEMPLATE_MODULES["recurrence"]  # not cut to 80 columns
    assert "…" not in out and "PRE_WARPS" in rec[3] and "mom-1.3b-prefill" in rec[4]


def _search(tmp_path, *extra: str) -> list[str]:  # noqa: ANN001
    return ["search", "--template", FAKE, "--shapes", "two", "--trials", "3", "--space-dir", SPACES,
            "--storage", f"sqlite:///{tmp_path}/s.db", "--retime", "1", "--rounds", "1", *extra]


def test_search_json_on_stdout_progress_on_stderr(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    assert main(_search(tmp_path, "--json")) == 0
    cap = capsys.readouterr()
    results = json.loads(cap.out)  # nothing else on stdout
    assert [r["study"] for r in results] == ["fake:interpreter:N5-C3-float32", "fake:interpreter:N40-C3-float32"]
    assert all(r["winner"] and r["winner_ms"] > 0 and r["stopped"] for r in results)
    assert results[1]["stopped"] == "trials reached" and results[1]["trials"] == 3
    err = cap.err
    assert "study 1 of 2: fake:interpreter:N5-C3-float32" in err and "study 2 of 2" in err
    # each trial line: done/target, elapsed and ETA
    assert re.search(r"trial +\d+ \[\d/3 \d\d:\d\d eta \d\d:\d\d\]", err)
    assert "[stopped: trials reached]" in err  # the stop reason survives (rich markup once swallowed it)


def test_quiet_prints_winners_only_and_verbose_every_trial(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    assert main(_search(tmp_path, "-q")) == 0
    out = capsys.readouterr().out
    assert "winner" in out and "trial " not in out and "study 1 of 2" not in out
    assert main(_search(tmp_path, "-v", "--trials", "4")) == 0
    out = capsys.readouterr().out
    assert "study 1 of 2" in out and re.search(r"trial +3 \[4/4", out)


def test_eta_is_the_rate_of_this_run_capped_by_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from momtune.progress import RichReporter, fmt_clock

    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    r = RichReporter(verbosity=-1)
    r.study_started("s", target=12, space_size=50, interpreter=True, done=2, timeout_s=None)
    now[0] += 20.0  # 4 trials of this run in 20 s: 5 s each, 6 left
    assert r._eta(6, 12) == pytest.approx(30.0)
    r.study_started("s", target=12, space_size=50, interpreter=True, done=2, timeout_s=25.0)
    now[0] += 20.0
    assert r._eta(6, 12) == pytest.approx(5.0)  # the timeout ends it sooner
    assert fmt_clock(3725) == "1:02:05" and fmt_clock(65) == "01:05" and fmt_clock(None) == "--:--"


def test_export_and_verify_json(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    assert main(_search(tmp_path, "-q")) == 0
    capsys.readouterr()
    lib = tmp_path / "lib.json"
    assert main(["export", "--storage", f"sqlite:///{tmp_path}/s.db", "--out", str(lib), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"out": str(lib), "gpu": "interpreter", "triton": out["triton"], "entries": 2,
                   "templates": {"fake": 2}}
    rc = main(["verify", str(lib), "--json", "--template-spec", f"fake={FAKE}"])
    cap = capsys.readouterr()
    data = json.loads(cap.out)
    assert data["checked"] == 2 and data["failed"] == 0 and {r["status"] for r in data["rows"]} == {"ok"}
    assert rc == (1 if data["slower"] else 0)  # interpreter timings on a busy machine may call one slower
    assert "momtune verify" in cap.err


def test_each_study_says_its_rate_and_time_to_first_result(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    """Issue 11's search-speed targets (configs per minute, first result) read off the log."""
    import time
    from types import SimpleNamespace

    from momtune.progress import RichReporter

    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    r = RichReporter()
    r.study_started("s", target=12, space_size=50, interpreter=False, done=2, timeout_s=None)
    now[0] += 6.0
    r.trial_done("s", 2, {"B": 1}, "ok", 1.0, "", False, 3, 12, 1.0, {"ok": 3})
    now[0] += 24.0
    r.trial_done("s", 3, {"B": 2}, "compile_error", None, "x", False, 4, 12, 1.0, {"ok": 3, "compile_error": 1})
    r.trial_done("s", 4, {"B": 3}, "ok", 2.0, "", False, 5, 12, 1.0, {"ok": 4, "compile_error": 1})
    r.study_finished(SimpleNamespace(winner=None, stopped="timeout"))
    out = capsys.readouterr().out
    assert "3 trials this run in 30 s (6.0 per minute), first result after 6.0 s" in out, out


def test_each_study_says_where_the_benchmark_workers_time_went(capsys) -> None:  # noqa: ANN001
    """What limits configs per minute (issue 11, item 2): the median seconds per trial in each phase."""
    from types import SimpleNamespace

    from momtune.progress import RichReporter
    from momtune.search import phase_medians

    rows = [{"inputs": 100.0, "reference": 9000.0, "first_run": 50.0, "check": 20.0, "timing": 300.0},
            {"inputs": 120.0, "reference": 0.0, "first_run": 40.0, "check": 30.0, "timing": 310.0},
            {"inputs": 110.0, "reference": 0.0, "first_run": 60.0, "check": 25.0}]  # a wrong answer: not timed
    phases, n = phase_medians(rows)
    assert n == 3 and list(phases) == ["inputs", "reference", "first_run", "check", "timing"]
    assert phases == {"inputs": 110.0, "reference": 0.0, "first_run": 50.0, "check": 25.0, "timing": 300.0}
    assert phase_medians([]) == (None, 0)
    r = RichReporter()
    r.study_started("s", target=3, space_size=9, interpreter=False, done=0, timeout_s=None)
    r.study_finished(SimpleNamespace(winner=None, stopped="timeout", phases_ms=phases, phase_trials=n))
    out = capsys.readouterr().out
    assert ("benchmark worker, median s per trial over 3: inputs 0.11, reference 0.00, first run 0.05, check 0.03, "
            "timing 0.30 (sum 0.48)") in out, out
