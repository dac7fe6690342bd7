"""A search killed with -9 (driver and worker) at random moments, again and again, then run to
the end: the database stays consistent (issue 15, item 8). Every kill lands somewhere in the
driver's or worker's life (starting, asking, measuring, saving, re-timing); whatever it hits,
no result is counted twice, none is half-written, and the final winner is one of the measured."""
from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import optuna

from momtune.space import canonical
from momtune.study import is_done

from .conftest import ROOT, SLOW, SPACES, cli_env, momtune_cmd

KILLS = 5
TRIALS = 8  # every config of the slow space (4 BLOCK x 2 num_warps)
HEARTBEAT_S = 1


def audit(study: optuna.Study) -> list[str]:
    """What is inconsistent in a finished study's trials and winner (empty when nothing)."""
    problems: list[str] = []
    done_configs: dict[str, int] = {}
    for t in study.trials:
        a = t.user_attrs
        if t.state.name == "RUNNING":
            problems.append(f"trial {t.number} still RUNNING after the heartbeat grace")
        if t.state.name == "COMPLETE":
            if a.get("status") != "ok" or not isinstance(a.get("time_ms"), float) or a["time_ms"] != t.value:
                problems.append(f"trial {t.number} COMPLETE with status {a.get('status')!r}, "
                                f"time {a.get('time_ms')!r}, value {t.value!r}")
            if "config" not in a or a.get("claim") != canonical(a["config"]):
                problems.append(f"trial {t.number} COMPLETE without its config and claim")
        if t.state.name == "FAIL" and is_done(t) and "config" not in a:
            problems.append(f"trial {t.number}: a recorded failure without its config")
        if is_done(t) and not a.get("cached"):
            key = canonical(a.get("config", {}))
            done_configs[key] = done_configs.get(key, 0) + 1
    problems += [f"config {k} measured {n} times" for k, n in done_configs.items() if n > 1]
    winner = study.user_attrs.get("winner")
    ok = {canonical(t.user_attrs["config"]) for t in study.trials if t.state.name == "COMPLETE"}
    if not winner or canonical(winner["config"]) not in ok or not math.isfinite(winner["time_ms"]):
        problems.append(f"winner {winner!r} is not one of the measured configs")
    elif winner["trials"] != sum(is_done(t) for t in study.trials):
        problems.append(f"winner counted {winner['trials']} trials, the study has "
                        f"{sum(is_done(t) for t in study.trials)} done")
    return problems


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=url).trials
    except KeyError:  # not created yet
        return []


def _trial_count(url: str, name: str) -> int:
    return len(_trials(url, name))


def _completed(url: str, name: str) -> int:
    return sum(t.state.name == "COMPLETE" for t in _trials(url, name))


def test_random_kill_9_loop_leaves_a_consistent_study(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/loop.db"
    args = ["search", "--template", SLOW, "--shapes", "tiny", "--trials", str(TRIALS), "--sampler", "grid",
            "--storage", url, "--space-dir", SPACES, "--heartbeat", str(HEARTBEAT_S), "--retime", "2",
            "--rounds", "1"]
    name = "slow:interpreter:N7-C9-float32"
    rng = random.Random(int(os.environ.get("MOMTUNE_KILL_SEED", "20261129")))
    completed_before: list[int] = []
    for i in range(KILLS):
        started = _trial_count(url, name)
        proc = subprocess.Popen(momtune_cmd(*args), cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        if i == 0:
            time.sleep(rng.uniform(0.5, 3.0))  # during start-up (imports, the worker's spawn)
        else:  # once this run has asked a trial: somewhere in measuring, saving, the next ask
            deadline = time.monotonic() + 120
            while _trial_count(url, name) <= started and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 1.5))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        completed_before.append(_completed(url, name))
        if completed_before[-1] >= TRIALS - 1:
            break  # leave the final run something to do
    final = subprocess.run(momtune_cmd(*args), cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                           timeout=300, check=False)
    assert final.returncode == 0, final.stdout + final.stderr
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S)
    time.sleep(3 * HEARTBEAT_S + 1)
    study = optuna.load_study(study_name=name, storage=storage)
    optuna.storages.fail_stale_trials(study)  # the killed runs' trials still inside their grace
    assert audit(study) == []
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len({canonical(t.user_attrs["config"]) for t in complete}) == TRIALS
    assert completed_before == sorted(completed_before)  # nothing completed was ever undone
    assert len(completed_before) >= 3, completed_before
    print("completed after each kill:", completed_before)


def test_audit_finds_what_a_torn_write_would_leave(tmp_path: Path) -> None:
    """The audit above is not vacuous: a COMPLETE trial without its status, a config measured
    twice and a winner that was never measured are each reported."""
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/a.db")
    for block in (16, 16):
        t = study.ask()
        for k, v in {"config": {"BLOCK": block}, "claim": canonical({"BLOCK": block}), "time_ms": 1.5,
                     "cached": False}.items():
            t.set_user_attr(k, v)
        study.tell(t, 1.5)
    study.set_user_attr("winner", {"config": {"BLOCK": 64}, "time_ms": 1.0, "trials": 2})
    problems = audit(study)
    assert any("COMPLETE with status None" in p for p in problems)
    assert any("measured 2 times" in p for p in problems)
    assert any("not one of the measured configs" in p for p in problems)
