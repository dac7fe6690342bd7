"""Trial bookkeeping that survives kills and other processes (issue 15, item 4): a worker killed
from outside is retried, then recorded as ``killed``; a trial whose process died while saving it
is lost, not done; a trial another process failed is redone; every process on a study uses the
heartbeat the study was started with."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from momtune.progress import Reporter
from momtune.search import SearchOptions, search
from momtune.space import canonical
from momtune.study import count, is_done, trials_of

from .conftest import FAKE, KILLER, RECORDER, SPACES


class Notes(Reporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_a_killed_or_crashed_worker_is_retried_once_then_recorded(storage: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed from outside, or dead as of an illegal memory access (which CUDA may report in the
    request after the faulting one): run again in the restarted worker; recorded only when it
    happens again."""
    monkeypatch.setenv("MOMTUNE_TEST_MARKERS", str(tmp_path))
    notes = Notes()
    [res] = search([KILLER], "tiny", SearchOptions(trials=8, sampler="grid", storage=storage, space_dir=SPACES,
                                                   heartbeat_s=2, retime=1, rounds=1), notes)
    study = optuna.load_study(study_name=res.study, storage=storage)
    by_fault = {t.user_attrs["config"]["FAULT"]: t for t in study.trials}
    assert set(by_fault) == {"none", "oom_once", "oom_always", "crash_once", "crash_always", "devmem_once",
                             "devmem_always", "devmem_thrice"}
    assert by_fault["none"].user_attrs["status"] == "ok" and by_fault["none"].user_attrs["attempts"] == 1
    once = by_fault["oom_once"]  # killed on its first run: not the config's fault, it ran again and passed
    assert once.state.name == "COMPLETE" and once.user_attrs["status"] == "ok" and once.user_attrs["attempts"] == 2
    always = by_fault["oom_always"]
    assert always.state.name == "FAIL" and always.user_attrs["status"] == "killed"
    assert always.user_attrs["attempts"] == 2
    assert "SIGKILL" in always.user_attrs["reason"] and "2 attempts" in always.user_attrs["reason"]
    assert is_done(always)  # a recorded outcome: a rerun does not run it a third time
    once = by_fault["crash_once"]
    assert once.state.name == "COMPLETE" and once.user_attrs["status"] == "ok" and once.user_attrs["attempts"] == 2
    crash = by_fault["crash_always"]
    assert crash.state.name == "FAIL" and crash.user_attrs["status"] == "illegal_memory"
    assert crash.user_attrs["attempts"] == 2 and "2 attempts" in crash.user_attrs["reason"]
    once = by_fault["devmem_once"]  # the device's memory was held elsewhere: ran again, passed
    assert once.state.name == "COMPLETE" and once.user_attrs["status"] == "ok" and once.user_attrs["attempts"] == 2
    devmem = by_fault["devmem_always"]
    assert devmem.state.name == "FAIL" and devmem.user_attrs["status"] == "out_of_memory"
    assert devmem.user_attrs["attempts"] == 2 and "out of memory" in devmem.user_attrs["reason"]
    thrice = by_fault["devmem_thrice"]  # no compile workers: two attempts, both out of memory
    assert thrice.user_attrs["status"] == "out_of_memory" and thrice.user_attrs["attempts"] == 2
    assert res.by_status == {"ok": 4, "killed": 1, "illegal_memory": 1, "out_of_memory": 2}
    assert sum("running it again" in n for n in notes.notes) == 7  # each faulty config once
    assert not any("compiles ran" in n for n in notes.notes)  # nothing to defer without compile workers


def test_device_out_of_memory_in_a_compile_worker_does_not_rule_a_config_out(storage: str, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A compile worker's run that finds the device's memory taken (H200, session 11: 16 compile
    workers' cached blocks at the recurrence's largest shape) is no verdict on the config: the
    benchmarking worker runs it (and retries it once itself). Nor is a benchmark run that finds it
    taken while the batch's other configs compile (H200, session 13: 38 of 40 recurrence-backward
    configs at N 196,608, the default among them): the config runs again, with its own retry, once
    the batch's compiles are done."""
    monkeypatch.setenv("MOMTUNE_TEST_MARKERS", str(tmp_path))
    notes = Notes()
    [res] = search([KILLER], "tiny", SearchOptions(trials=8, sampler="grid", storage=storage, space_dir=SPACES,
                                                   heartbeat_s=2, retime=1, rounds=1, workers=2), notes)
    study = optuna.load_study(study_name=res.study, storage=storage)
    by_fault = {t.user_attrs["config"]["FAULT"]: t for t in study.trials}
    once = by_fault["devmem_once"]  # out of memory in its compile run only: benchmarked, passed
    assert once.state.name == "COMPLETE" and once.user_attrs["status"] == "ok" and once.user_attrs["attempts"] == 1
    devmem = by_fault["devmem_always"]  # compile run, then two benchmark attempts
    assert devmem.user_attrs["status"] == "out_of_memory" and devmem.user_attrs["attempts"] == 2
    # out of memory in its compile run and in its benchmark run beside the other compile: run again
    # after the batch's compiles, out of memory once more, then passed on its retry
    thrice = by_fault["devmem_thrice"]
    assert thrice.state.name == "COMPLETE" and thrice.user_attrs["status"] == "ok"
    assert thrice.user_attrs["attempts"] == 2
    deferred = [n for n in notes.notes if "compiles ran" in n]
    assert len(deferred) == 2 and all("out of memory" in n for n in deferred)  # devmem_always, devmem_thrice
    assert "out_of_resources" not in res.by_status


def test_a_compile_worker_runs_a_config_on_the_inputs_its_trial_runs_on(storage: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """H200, session 13: the recurrence backward's trials spent 2-6 s of their first run compiling
    in the benchmarking worker although a compile worker had just run the config: compile runs used
    input seed 0, trials their own seed, and the ragged segments drawn from the seed change integer
    arguments Triton specialises on (a chunk count divisible by 16 or not), so the compile workers
    built kernels no trial ran. Each compile run now uses its trial's inputs."""
    monkeypatch.setenv("MOMTUNE_TEST_MARKERS", str(tmp_path))
    search([RECORDER], "tiny", SearchOptions(trials=3, sampler="grid", storage=storage, space_dir=SPACES,
                                             retime=1, rounds=1, workers=2))
    lines = [line.split() for line in (tmp_path / "launches").read_text().splitlines()]
    compiled = {(block, a) for who, block, a in lines if who.startswith("momtune-compile")}
    benched = {(block, a) for who, block, a in lines if who.startswith("momtune-bench")}
    assert {block for block, _ in compiled} == {"16", "32", "64"}  # every config ran in a compile worker
    assert compiled <= benched, f"compiled on inputs no trial ran: {sorted(compiled - benched)}"


def _running_trial_with(study: optuna.Study, config: dict[str, Any], status: str) -> int:
    """A trial as a process killed between writing its status and its state leaves it."""
    trial = study.ask()
    trial.set_user_attr("claim", canonical(config))
    trial.set_user_attr("config", config)
    trial.set_user_attr("time_ms", 1.0)
    trial.set_user_attr("status", status)
    return trial._trial_id


@pytest.mark.parametrize("status", ["ok", "invalid_config", "compile_error"])
def test_a_trial_killed_while_being_saved_is_lost_unless_its_failure_was_written(storage: str, status: str) -> None:
    from momtune.report.studies import _trial

    study = optuna.create_study(study_name="s", storage=storage)
    tid = _running_trial_with(study, {"BLOCK": 32}, status)
    study._storage.set_trial_state_values(tid, state=optuna.trial.TrialState.FAIL)  # what the heartbeat does
    [t] = trials_of(study)
    c = count([t])
    if status == "compile_error":  # the failure is the config's result, whatever wrote the state
        assert is_done(t) and c.done == 1 and c.by_status == {"compile_error": 1}
        assert _trial(t).status == "compile_error"
    else:  # an "ok" never told (or an invalid config, told as PRUNED): no result, the config runs again
        assert not is_done(t) and c.done == 0 and c.measured == set()
        assert _trial(t).status == "lost"


def test_the_search_reruns_a_config_whose_ok_was_never_told(storage: str) -> None:
    opts = SearchOptions(trials=2, sampler="grid", storage=storage, space_dir=SPACES, heartbeat_s=1, retime=1,
                         rounds=1)
    [first] = search([FAKE], "tiny", SearchOptions(**{**opts.__dict__, "trials": 1}))
    study = optuna.load_study(study_name=first.study, storage=storage)
    default = study.trials[0].user_attrs["config"]
    other = {**default, "BLOCK": 64 if default["BLOCK"] != 64 else 16}
    tid = _running_trial_with(study, other, "ok")
    study._storage.set_trial_state_values(tid, state=optuna.trial.TrialState.FAIL)
    [res] = search([FAKE], "tiny", opts)
    assert res.trials == 2
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and len({canonical(t.user_attrs["config"]) for t in done}) == 2


def test_a_trial_failed_by_another_process_is_dropped_and_redone(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process (a shorter grace, a stalled machine) marks this process's live trial FAIL
    while it runs: the result cannot be saved (Optuna's UpdateFinishedTrialError); the search says
    so and runs the config again instead of crashing."""
    from momtune import search as search_mod

    real_call = search_mod.Worker.call
    failed: list[int] = []

    def call(self: Any, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        reply = real_call(self, request, timeout)
        if request.get("op") == "trial" and not failed:
            st = optuna.storages.RDBStorage(storage)
            [sid] = [s._study_id for s in st.get_all_studies()]
            for t in st.get_all_trials(sid):
                if t.state.name == "RUNNING":
                    st.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
                    failed.append(t.number)
        return reply

    monkeypatch.setattr(search_mod.Worker, "call", call)
    notes = Notes()
    [res] = search([FAKE], "tiny", SearchOptions(trials=2, sampler="grid", storage=storage, space_dir=SPACES,
                                                 heartbeat_s=2, retime=1, rounds=1), notes)
    assert failed == [0]
    study = optuna.load_study(study_name=res.study, storage=storage)
    lost = [t for t in study.trials if t.state.name == "FAIL"]
    assert [t.number for t in lost] == [0] and "status" not in lost[0].user_attrs
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and res.trials == 2
    assert lost[0].user_attrs["claim"] in {canonical(t.user_attrs["config"]) for t in done}  # redone
    assert any("trial 0: another process marked it failed" in n for n in notes.notes)


def test_every_process_on_a_study_uses_the_heartbeat_it_was_started_with(storage: str) -> None:
    base = dict(sampler="grid", storage=storage, space_dir=SPACES, retime=1, rounds=1)
    [first] = search([FAKE], "tiny", SearchOptions(trials=1, heartbeat_s=7, **base))
    notes = Notes()
    [second] = search([FAKE], "tiny", SearchOptions(trials=2, heartbeat_s=1, **base), notes)
    assert second.study == first.study and second.trials == 2
    study = optuna.load_study(study_name=first.study, storage=storage)
    assert study.user_attrs["heartbeat_s"] == 7
    assert any("heartbeat 7 s" in n and "--heartbeat 1" in n for n in notes.notes)
