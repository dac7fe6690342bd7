"""The search loop on fake templates in the interpreter: every failure kind recorded, invalid
configs pruned, repeated suggestions reused, winners re-timed, resume after kill -9."""
from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from momtune.search import SearchOptions, search
from momtune.space import canonical, load_space
from momtune.study import count, trials_of

from .conftest import FAKE, FAULTY, ROOT, SLOW, SPACES, cli_env, momtune_cmd

EXPECTED = {"none": "ok", "compile_error": "compile_error", "out_of_resources": "out_of_resources", "hang": "timeout",
            "crash": "illegal_memory", "wrong": "wrong_answer", "unwritten": "wrong_answer", "error": "error"}


def load(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.parametrize("workers", [None, 2], ids=["bench-only", "compile-workers2"])
def test_every_failure_kind_is_recorded_and_search_reaches_winner(storage: str, workers: int | None) -> None:
    opts = SearchOptions(trials=20, sampler="grid", storage=storage, space_dir=SPACES, trial_timeout_s=4,
                         heartbeat_s=2, retime=2, rounds=1, workers=workers)
    [res] = search([FAULTY], "tiny", opts)
    assert res.study == "faulty:interpreter:N7-C9-float32" and res.interpreter
    assert res.stopped == "every valid config measured" and res.trials == 9
    study = load(storage, res.study)
    seen: dict[str, set[str]] = {}
    for t in study.trials:
        fault, status = t.user_attrs["config"]["FAULT"], t.user_attrs["status"]
        seen.setdefault(fault, set()).add(status)
        assert t.user_attrs["cached"] is False
        phases = t.user_attrs.get("phases_ms")
        if status == "ok":
            assert t.state.name == "COMPLETE" and t.value == t.user_attrs["time_ms"] > 0
            assert t.user_attrs["max_abs_err"] < 1e-5
            # where the benchmark worker's time went, every phase reached
            assert set(phases) == {"inputs", "reference", "first_run", "check", "timing"}
            assert all(v >= 0 for v in phases.values()) and phases["timing"] > 0
        elif status == "wrong_answer":  # stopped at its check: never timed
            assert "check" in phases and "timing" not in phases
        if status != "ok":
            assert t.state.name == "FAIL" and t.user_attrs["reason"] and "\n" not in t.user_attrs["reason"]
    assert seen == {k: {v} for k, v in EXPECTED.items()}
    by_fault = {t.user_attrs["config"]["FAULT"]: t.user_attrs["reason"] for t in study.trials
                if t.user_attrs["config"]["BLOCK"] == 32}
    assert "invalid tile shape" in by_fault["compile_error"]
    assert "NaN" in by_fault["unwritten"] and "4 s" in by_fault["hang"] and "exit code 3" in by_fault["crash"]
    assert res.by_status == {"ok": 2, "compile_error": 1, "out_of_resources": 1, "timeout": 1, "illegal_memory": 1,
                             "wrong_answer": 2, "error": 1}
    assert res.winner is not None and res.winner["FAULT"] == "none"
    with_phases = [t.user_attrs["phases_ms"] for t in study.trials if "phases_ms" in t.user_attrs]
    assert res.phase_trials == len(with_phases) >= 4  # the 2 ok and the 2 wrong answers at least
    assert res.phases_ms["timing"] == statistics.median(p.get("timing", 0.0) for p in with_phases)
    attrs = study.user_attrs
    assert attrs["winner"]["config"] == res.winner and attrs["winner"]["retimed"] is True
    assert attrs["template"] == "faulty" and attrs["shape"] == {"N": 7, "C": 9} and attrs["dtype"] == "float32"
    assert attrs["shape_key"] == "N7-C9-float32" and attrs["shape_set"] == "tiny" and attrs["gpu"] == "interpreter"
    assert attrs["interpreter"] is True and attrs["sampler"] == "grid" and attrs["space_size"] == 9
    assert attrs["default_config"] == {"BLOCK": 32, "num_warps": 1, "FAULT": "none"}
    assert attrs["default_time_ms"] > 0 and attrs["floor_ms"] > 0
    assert attrs["provenance"]["triton"] and attrs["provenance"]["source_hash"]


def test_invalid_configs_are_pruned_and_do_not_count(storage: str) -> None:
    opts = SearchOptions(trials=4, sampler="random", seed=3, storage=storage, space_dir=SPACES, retime=1, rounds=1)
    [res] = search([FAKE], "tiny", opts)
    study = load(storage, res.study)
    space = load_space("fake", SPACES)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned, "seed 3 is expected to suggest invalid configs"
    for t in pruned:
        assert t.user_attrs["status"] == "invalid_config" and "BLOCK" in t.user_attrs["reason"]
        assert not space.is_valid(t.params, {"N": 7, "C": 9})[0]
    assert count(trials_of(study)).done == 4 == res.trials
    assert study.trials[0].params == space.default_config()  # the default runs first


SPARSE = """
[template]
name = "fake"

[parameters.BLOCK]
choices = [16, 32, 64, 128]
default = 32

[parameters.num_warps]
choices = [1, 2, 4, 8, 16, 32]
default = 1

[parameters.X]
choices = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
default = 0

[[constraints]]
expr = "X == 0 and (num_warps == 1 or BLOCK == 128)"
why = "9 of 240 configs are valid"

[shapes.tiny]
dtype = "float32"
shapes = [ { N = 7, C = 9 } ]
"""


def test_sparse_space_still_progresses(storage: str, tmp_path: os.PathLike[str]) -> None:
    (Path(tmp_path) / "fake.toml").write_text(SPARSE)
    opts = SearchOptions(trials=5, sampler="random", seed=1, storage=storage, space_dir=str(tmp_path), retime=1,
                         rounds=1)
    [res] = search([FAKE], "tiny", opts)
    assert res.trials == 5 and res.stopped == "trials reached" and res.by_status == {"ok": 5}
    study = load(storage, res.study)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert len(pruned) >= 20  # random suggestions miss; after 20 misses in a row a valid config is drawn
    assert len(pruned) < 20 * 5


def test_repeated_suggestion_reuses_measured_result(storage: str) -> None:
    opts = SearchOptions(trials=1, storage=storage, space_dir=SPACES, retime=1, rounds=1)
    [res] = search([FAKE], "tiny", opts)
    study = load(storage, res.study)
    first = study.trials[0]
    study.enqueue_trial(first.params)  # the sampler suggests the same config again
    opts.trials = 2
    search([FAKE], "tiny", opts)
    study = load(storage, res.study)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and done[1].params == first.params
    assert done[1].user_attrs["cached"] is True and done[1].value == first.value
    assert done[1].user_attrs["time_ms"] == first.user_attrs["time_ms"]
    assert "seed" not in done[1].user_attrs  # not run again


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_resume_after_kill_keeps_done_trials_and_reaches_target(tmp_path: os.PathLike[str], sig: int) -> None:
    url = f"sqlite:///{tmp_path}/resume.db"
    args = ["search", "--template", SLOW, "--shapes", "tiny", "--trials", "6", "--sampler", "grid", "--storage", url,
            "--space-dir", SPACES, "--heartbeat", "1", "--retime", "1", "--rounds", "1"]
    proc = subprocess.Popen(momtune_cmd(*args), cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    name = "slow:interpreter:N7-C9-float32"
    deadline = time.monotonic() + 120
    before: list[optuna.trial.FrozenTrial] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            try:
                before = [t for t in load(url, name).trials if t.state.name == "COMPLETE"]
            except Exception:  # noqa: BLE001 - study not created yet
                continue
            if len(before) >= 2:
                break
    finally:
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)  # the search and its worker, mid-trial
        else:
            os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    assert 2 <= len(before) < 6, "the search should be killed after 2 trials"
    if sig == signal.SIGINT:  # interrupted cleanly: the trial in flight is released, none left RUNNING
        assert rc == 130
        assert not any(t.state.name == "RUNNING" for t in load(url, name).trials)
    assert not load(url, name).user_attrs.get("winner")
    rerun = subprocess.run(momtune_cmd(*args), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "done already" in rerun.stdout
    study = load(url, name)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    states = [(t.number, t.state.name, t.user_attrs.get("status"), t.user_attrs.get("reason")) for t in study.trials]
    assert len(done) == 6, (states, rerun.stdout)
    configs = [canonical(t.params) for t in done]
    assert len(set(configs)) == 6  # nothing ran twice
    after = {t.number: t for t in done}
    for t in before:  # kept as they were, not run again
        assert after[t.number].datetime_complete == t.datetime_complete and after[t.number].value == t.value
    lost = [t for t in study.trials if t.state.name == "FAIL"]
    assert all("status" not in t.user_attrs for t in lost)  # only a trial killed mid-run, failed by heartbeat
    assert not any(t.state.name == "RUNNING" for t in study.trials)
    assert study.user_attrs["winner"]["trials"] == 6 and not math.isnan(study.user_attrs["winner"]["time_ms"])


@pytest.mark.parametrize("sampler", ["cmaes", "nope"])
def test_unknown_sampler_rejected(storage: str, sampler: str) -> None:
    from momtune.errors import InputError

    with pytest.raises(InputError, match="tpe, random, grid, exhaustive"):
        search([FAKE], "tiny", SearchOptions(trials=1, sampler=sampler, storage=storage, space_dir=SPACES))


def test_unknown_shape_set_lists_sets(storage: str) -> None:
    from momtune.errors import InputError

    with pytest.raises(InputError, match="no shape set 'huge'.*tiny, two"):
        search([FAKE], "huge", SearchOptions(trials=1, storage=storage, space_dir=SPACES))


HANGS = """
[template]
name = "faulty"

[parameters.BLOCK]
choices = [32, 64]
default = 32

[parameters.num_warps]
choices = [1]
default = 1

[parameters.FAULT]
choices = ["none", "hang"]
default = "none"

[shapes.tiny]
dtype = "float32"
shapes = [ { N = 7, C = 9 } ]
"""


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of candidates each batch sent to the compile workers (in order)."""
    from momtune.worker import WorkerPool

    sizes: list[int] = []
    orig = WorkerPool.imap_unordered

    def spy(self, requests, timeout):  # noqa: ANN001
        sizes.append(len(requests))
        return orig(self, requests, timeout)

    monkeypatch.setattr(WorkerPool, "imap_unordered", spy)
    return sizes


def test_slow_compile_delays_only_itself(storage: str, tmp_path: os.PathLike[str]) -> None:
    """One batch of 4 on 4 compile workers, two of whose compiles hang: the two good configs are
    benchmarked and recorded while the hanging compiles are still running (seen on the H100: one
    pathological recurrence config held up a whole batch for the full trial timeout)."""
    (Path(tmp_path) / "faulty.toml").write_text(HANGS)
    opts = SearchOptions(trials=4, sampler="grid", storage=storage, space_dir=str(tmp_path), trial_timeout_s=6,
                         heartbeat_s=2, retime=1, rounds=1, workers=4)
    [res] = search([FAULTY], "tiny", opts)
    assert res.by_status == {"ok": 2, "timeout": 2}
    trials = load(storage, res.study).trials
    ok = [t for t in trials if t.user_attrs["status"] == "ok"]
    hung = [t for t in trials if t.user_attrs["status"] == "timeout"]
    first_hang_done = min(t.datetime_complete for t in hung)
    assert all((t.datetime_complete - t.datetime_start).total_seconds() >= 6 for t in hung)
    assert all(t.datetime_complete < first_hang_done for t in ok)


def test_batch_fills_every_compile_worker(storage: str, tmp_path: os.PathLike[str], batches: list[int]) -> None:
    """9 of 240 configs are valid: invalid suggestions are told at once and do not take a compile
    slot, so each batch compiles as many configs as there are workers."""
    (Path(tmp_path) / "fake.toml").write_text(SPARSE)
    opts = SearchOptions(trials=6, sampler="random", seed=1, storage=storage, space_dir=str(tmp_path), retime=1,
                         rounds=1, workers=3)
    [res] = search([FAKE], "tiny", opts)
    assert res.trials == 6 and res.by_status == {"ok": 6}
    cached = sum(t.user_attrs.get("cached", False) for t in load(storage, res.study).trials)
    # a batch's slots go to compiles or to repeats of measured configs (cached); before the fix a
    # batch of 3 asks compiled about one config (6 batches of 1 here)
    assert sum(batches) + cached == 6 and len(batches) <= 3 and max(batches) >= 2


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of configs each batch set out to run (in order), before repeats of measured
    configs are answered from the study (those never reach the compile workers)."""
    from momtune.search import Engine

    sizes: list[int] = []
    orig = Engine._run_batch

    def spy(self, ctx, bencher, n):  # noqa: ANN001
        sizes.append(n)
        return orig(self, ctx, bencher, n)

    monkeypatch.setattr(Engine, "_run_batch", spy)
    return sizes


def test_tpe_batches_leave_room_to_learn(storage: str, batch_sizes: list[int]) -> None:
    """With 4 compile workers and 8 trials, TPE asks at most 2 configs at a time (a quarter of the
    trials), so most of its suggestions come after results it can learn from. (Counting compile
    requests instead was flaky: a batch whose suggestions repeat measured configs compiles nothing.)"""
    opts = SearchOptions(trials=8, sampler="tpe", storage=storage, space_dir=SPACES, retime=1, rounds=1, workers=4)
    [res] = search([FAKE], "tiny", opts)
    assert res.trials == 8
    assert batch_sizes and max(batch_sizes) <= 2 and len(batch_sizes) >= 4
