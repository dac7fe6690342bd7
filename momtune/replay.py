"""Offline replay of a search against a recorded landscape: a sampler's search quality measured
without a GPU.

A :class:`Landscape` is a study's recorded results used as an oracle (config -> time, or the
failure it recorded), e.g. an exhaustive sweep of a reduced space on the H200. :func:`replay`
runs ``momtune search``'s own driver (:class:`momtune.search.Engine`: the default first, the
batches of ``--workers`` compile workers, TPE's smaller batches, claims, cached repeats, invalid
suggestions pruned and not counted, the winner's re-timing) with the benchmarking worker and the
compile pool replaced by that oracle, in a throw-away SQLite storage. A study that recorded only
part of its space (a TPE or pattern study) replays on the configs it recorded: the others are
invalid for the replay (pruned, not counted), so every sampler searches the same sub-space.

What a replay is not: a GPU measurement. Each config has one recorded time (``noise`` adds a
seeded relative jitter to each trial and re-timing, as a GPU's would), and the compile workers
answer at once, so nothing is cut by ``--timeout``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .space import SearchSpace, canonical, load_space



@dataclass
class Landscape:
    """Recorded results of one template at one shape: ``results[canonical(config)]`` is the reply a
    benchmarking worker gave (``status``, ``time_ms`` when ok, ``reason``)."""

    template: str
    shape: dict[str, int]
    dtype: str
    space: SearchSpace  # restricted to the recorded configs (``complete``: every valid one was)
    results: dict[str, dict[str, Any]]
    gpu: str = "replay"
    name: str = ""
    complete: bool = True

    @property
    def best_ms(self) -> float:
        return min(self.times().values(), default=math.inf)

    @property
    def best_config(self) -> dict[str, Any] | None:
        times = self.times()
        return json.loads(min(times, key=lambda k: (times[k], k))) if times else None

    def times(self) -> dict[str, float]:
        return {k: float(r["time_ms"]) for k, r in self.results.items() if r.get("status") == "ok"}

    @classmethod
    def from_function(cls, template: str, space: SearchSpace, shape: Mapping[str, int], dtype: str,
                      cost: Callable[[Mapping[str, Any]], float | str], name: str = "synthetic") -> "Landscape":
        """Every valid config of ``space`` at ``shape`` timed by ``cost`` (a time in ms, or a failure
        status such as ``"illegal_memory"``)."""
        results: dict[str, dict[str, Any]] = {}
        for c in space.enumerate(shape):
            t = cost(c)
            results[canonical(c)] = ({"status": t, "reason": f"synthetic {t}"} if isinstance(t, str)
                                     else {"status": "ok", "time_ms": float(t)})
        return cls(template, dict(shape), dtype, space, results, name=name)

    @classmethod
    def from_study(cls, storage: str, study: str, space_dir: str | None = None) -> "Landscape":
        """The done trials of ``study``; a config's time is its fastest ok trial, else its failure. A
        config without a parameter of today's space (added since) takes its default; configs that are
        not valid in today's space are left out."""
        import optuna

        from .study import is_done, open_storage
        from .templates import resolve_template

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        s = optuna.load_study(study_name=study, storage=open_storage(storage, read_only=True))
        a = s.user_attrs
        spec = str(a.get("template_spec") or a["template"])
        space = load_space(resolve_template(spec).name, space_dir, template=resolve_template(spec))
        shape = {k: int(v) for k, v in a["shape"].items()}
        results: dict[str, dict[str, Any]] = {}
        default = space.default_config()
        for t in s.trials:
            config = t.user_attrs.get("config")
            if not is_done(t) or not isinstance(config, Mapping):
                continue
            config = {**default, **config}  # a parameter added since the study ran takes its default
            if not space.is_valid(config, shape)[0]:
                continue
            key, status = canonical(config), str(t.user_attrs.get("status"))
            if status == "ok" and t.value is not None:
                old = results.get(key, {})
                if old.get("status") != "ok" or float(t.value) < old["time_ms"]:
                    results[key] = {"status": "ok", "time_ms": float(t.value)}
            elif key not in results:
                results[key] = {"status": status, "reason": str(t.user_attrs.get("reason", ""))}
        valid = {canonical(c) for c in space.enumerate(shape)}
        complete = valid <= set(results)
        if not complete:
            space = restricted(space, set(results))
        return cls(spec, shape, str(a["dtype"]), space, results, str(a.get("gpu", "replay")), study, complete)


def restricted(space: SearchSpace, keys: set[str]) -> SearchSpace:
    """``space`` with only the configs in ``keys`` valid (the others fail its config check)."""
    inner = space.check_config

    def check(shape: Mapping[str, int], config: Mapping[str, Any]) -> str | None:
        if canonical(config) not in keys:
            return "not recorded in the replayed study"
        return inner(shape, config) if inner is not None else None

    return dataclasses.replace(space, check_config=check)


class _Oracle:
    """Stands in for the benchmarking worker and the compile pool: answers from the landscape."""

    def __init__(self, land: Landscape, workers: int, noise: float, seed: int) -> None:
        self.land, self.noise, self.seed = land, noise, seed
        self.name = "replay-oracle"
        self.info = {"gpu": land.gpu}
        self.workers = [None] * workers
        self.calls = 0
        self.batches: list[int] = []  # configs per batch the driver handed the compile workers

    def _time(self, key: str) -> float:
        self.calls += 1
        t = self.land.results[key]["time_ms"]
        if not self.noise:
            return t
        return t * math.exp(random.Random(f"{self.seed}:{key}:{self.calls}").gauss(0.0, self.noise))

    def result(self, config: Mapping[str, Any]) -> dict[str, Any]:
        key = canonical(config)
        r = self.land.results.get(key)
        if r is None:
            return {"status": "error", "reason": "replay: config not in the landscape"}
        return {**r, "time_ms": self._time(key)} if r["status"] == "ok" else dict(r)

    def call(self, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        if request.get("op") == "retime":
            times = [(self._time(canonical(c)), max(self.noise, 0.002), 5)
                     if self.land.results.get(canonical(c), {}).get("status") == "ok" else (math.inf, 0.0, 0)
                     for c in request["configs"]]
            return {"status": "ok", "times": times, "errors": []}
        return self.result(request["config"])

    def imap_unordered(self, requests: Sequence[Mapping[str, Any]], timeout: float) -> Iterator[tuple[int, dict]]:
        from .search import COMPILE_FAILURES

        self.batches.append(len(requests))
        for i, req in enumerate(requests):  # a compile worker reports only what compiling shows
            r = self.land.results.get(canonical(req["config"]), {})
            yield i, (dict(r) if r.get("status") in COMPILE_FAILURES else {"status": "ok"})

    def close(self) -> None:
        pass


@dataclass
class ReplayRun:
    sampler: str
    seed: int
    trials: int  # done trials (cached repeats count, as in a search)
    measured: list[tuple[dict[str, Any], str, float | None]]  # (config, status, recorded time) in trial order
    winner: dict[str, Any] | None
    winner_ms: float  # the winner's recorded time (the landscape's, without noise)
    best_ms: float  # the landscape's best
    found_ms: float = math.inf  # the best recorded time among the measured configs
    batches: tuple[int, ...] = ()  # configs per batch the driver asked the sampler for at once

    @property
    def ratio(self) -> float:
        return self.winner_ms / self.best_ms


def replay(land: Landscape, sampler: str, seed: int, trials: int, workers: int = 16, noise: float = 0.0,
           storage_dir: str | Path | None = None, transfer: bool = False) -> ReplayRun:
    """One ``momtune search --sampler SAMPLER --seed SEED --trials TRIALS --workers WORKERS
    --no-transfer`` of ``land``'s template and shape, the worker answers replaced by ``land``
    (``transfer``: without --no-transfer, so the pattern search measures the space's [[starts]]
    first; other studies' winners there are none, the storage being the replay's own)."""
    from .progress import Reporter
    from .search import Engine, SearchOptions
    from .study import open_storage, trials_of

    class OracleEngine(Engine):
        def start(self) -> None:
            import warnings

            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            self.storage = open_storage(self.o.storage, heartbeat_s=self.o.heartbeat_s)
            self.benchers = [oracle]  # type: ignore[list-item]
            self.pool = oracle  # type: ignore[assignment]
            self.info = oracle.info

        def close(self) -> None:
            pass

    oracle = _Oracle(land, workers, noise, seed)
    if storage_dir is None and Path("/dev/shm").is_dir():
        storage_dir = "/dev/shm"  # in memory: a search writes the storage at every ask and tell
    with tempfile.TemporaryDirectory(dir=storage_dir, prefix="momtune-replay-") as tmp:
        opts = SearchOptions(trials=trials, sampler=sampler, storage=f"sqlite:///{Path(tmp) / 'replay.db'}",
                             study_prefix=f"{sampler}-s{seed}", workers=workers, seed=seed, transfer=transfer)
        engine = OracleEngine(opts, Reporter())
        engine.start()
        res = engine.run_study(land.template, land.space, land.shape, land.dtype, "replay")
        import optuna

        study = optuna.load_study(study_name=res.study, storage=engine.storage)
        done = [t for t in sorted(trials_of(study), key=lambda t: t.number)
                if t.state.name in ("COMPLETE", "FAIL") and "config" in t.user_attrs]
        engine.storage.engine.dispose()
    recorded = land.times()
    measured = [(dict(t.user_attrs["config"]), str(t.user_attrs.get("status")),
                 recorded.get(canonical(t.user_attrs["config"]))) for t in done]
    found = min((m for _, _, m in measured if m is not None), default=math.inf)
    win_ms = recorded.get(canonical(res.winner), math.inf) if res.winner else math.inf
    return ReplayRun(sampler, seed, res.trials, measured, res.winner, win_ms, land.best_ms, found,
                     tuple(oracle.batches))


def median_ratio(runs: Sequence[ReplayRun]) -> float:
    return statistics.median(r.ratio for r in runs)
