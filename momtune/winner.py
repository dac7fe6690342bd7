"""Naming a study's winner: the best few configs and the default, re-timed interleaved.

The top ``k`` distinct configs by their trial times (plus the default config when it passed its
check) are the candidates; the default is re-timed with them for ``default_time_ms``. The winner
is :func:`momtune.timing.pick_winner` over the re-timed medians (ties within noise go to the
smallest canonical config), so every machine picks the same winner from equal timings; then a
winner that is not faster than the default beyond noise (:func:`momtune.timing.judge`) is no
win: the default is kept, and ``default_kept`` records the config that came within noise. The
default is kept so even when it has no result of its own (not run before the study's time ran
out), but not when one of its trials recorded a failure of its own (:func:`momtune.study.is_config_failure`),
unless that failure was running out of the device's memory and the re-timing then ran it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .space import canonical
from .study import DEVICE_STATE_FAILURES, failure_kinds, is_config_failure
from .timing import Timing, judge, pick_winner

Retimer = Callable[[Sequence[Mapping[str, Any]]], "list[Timing] | None"]


def choose_winner(trials: Iterable[Any], default_config: Mapping[str, Any], k: int, done: int,
                  retime: Retimer, default_valid: bool = True) -> tuple[dict[str, Any] | None, float | None]:
    """(winner attr, default_time_ms) from a study's trials; (None, None) if no config passed.

    ``retime(configs)`` re-times configs interleaved (None if that failed: the trials' own times
    are used and the winner is marked ``retimed: false``). ``default_valid``: the default config
    is a config of the search space for this shape (its constraints hold).
    """
    best: dict[str, float] = {}
    configs: dict[str, dict[str, Any]] = {}
    trials = list(trials)
    refused: set[str] = set()  # configs with a recorded failure (wrong answer, error, ...)
    for t in trials:
        if t.state.name == "COMPLETE" and t.user_attrs.get("status") == "ok":
            key = canonical(t.user_attrs["config"])
            best[key] = min(best.get(key, math.inf), float(t.value))
            configs[key] = dict(t.user_attrs["config"])
        elif is_config_failure(t) and isinstance(t.user_attrs.get("config"), Mapping):
            refused.add(canonical(t.user_attrs["config"]))
    if not best:
        return None, None
    top = sorted(best, key=lambda key: (best[key], key))[: max(1, k)]
    dkey = canonical(default_config)
    # the default may keep its place without a result of its own (its trial was not run before the
    # study's time ran out): it is what runs without a library; a recorded failure of it is not,
    # except running out of the device's memory, when the re-timing below then runs it (the memory
    # was held by other processes at the time: H200, session 13, the recurrence backward's default
    # at N 196,608 beside 16 compile workers; a winner 11% slower than it was named)
    own = failure_kinds(trials, default_config) if dkey in refused else set()
    oom_only = bool(own) and own <= DEVICE_STATE_FAILURES
    keepable = dkey in best or (default_valid and (dkey not in refused or oom_only))
    configs.setdefault(dkey, dict(default_config))
    cands = top + ([dkey] if dkey in best and dkey not in top else [])
    timed = cands + ([dkey] if dkey not in cands else [])
    measured = retime([configs[key] for key in timed])
    retimed = measured is not None
    times = dict(zip(timed, measured)) if measured is not None else {
        key: Timing(best.get(key, math.inf), 0.0, 1) for key in timed}
    win = cands[pick_winner([(configs[key], times[key]) for key in cands])]
    default_ms = times[dkey].median_ms if math.isfinite(times[dkey].median_ms) else None
    if oom_only and dkey not in best and (not retimed or default_ms is None):
        keepable = False  # out of memory in its trials and not measured since: no evidence it runs
    kept = None
    if retimed and win != dkey and keepable:
        # a win within noise of the default (or slower than it) is no win: the default is kept
        w, d = times[win], times[dkey]
        if math.isfinite(d.median_ms) and judge(w.median_ms, d.median_ms, w.spread, d.spread) != "faster":
            kept = {"config": configs[win], "time_ms": w.median_ms, "spread": w.spread}
            win = dkey
    winner = {"config": configs[win], "time_ms": times[win].median_ms, "spread": times[win].spread,
              "retimed": retimed, "trials": done, "default_kept": kept,
              "candidates": [{"config": configs[key], "time_ms": times[key].median_ms,
                              "spread": times[key].spread} for key in cands]}
    return winner, default_ms
