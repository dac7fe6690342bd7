"""The search driver: one Optuna study per (template, GPU, shape), trials run in worker processes.

Trial flow (ask/tell): pick a config (the default first; then the sampler's suggestion, or for
``grid``/``exhaustive`` the next unclaimed valid config) -> a config violating the constraints is
PRUNED (``invalid_config``, not counted) -> a config measured before reuses that result
(``cached``) -> on a GPU, compile workers run it once (warm Triton cache) -> the benchmarking
worker checks it on fresh inputs against the float64 reference and times it -> the trial is
told COMPLETE (time in ms) or FAIL (status and reason). When the study has its trials, the best
few configs and the default are re-timed interleaved and the winner is written to the study.
A rerun of the same command resumes: trials already done count toward ``trials``.
"""
from __future__ import annotations

import math
import os
import random
import statistics
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import pattern
from .errors import InputError
from .progress import Reporter
from .space import SearchSpace, canonical, load_space
from .study import (RETRIED_ATTEMPTS, SAMPLERS, InFlight, Shield, claim_config, count, is_done, make_sampler,
                    measured_result, pinning_sampler, shape_key, storage_failure, study_name, trials_of)
from .templates import resolve_template
from .timing import NOMINAL_PEAKS, Timing, TimingOptions, floor_ms
from .winner import choose_winner
from .worker import INTERPRETER_WRONG_DTYPES, Worker, WorkerPool, prepare_environment, start_all



INVALID_FALLBACK = 20  # after this many invalid suggestions in a row, a random valid unmeasured config runs
LEARNT_STARTS = 8  # at most this many winners of other studies measured right after the default
#: a compile worker's outcomes that are the config's verdict (it is not benchmarked); any other
#: failure there (the device's memory taken, a killed worker) leaves it to the benchmarking worker
COMPILE_FAILURES = ("compile_error", "out_of_resources", "timeout")
#: the input sets a study's trials are checked on: trial n uses seeds trial_seed(seed, n) (check run)
#: and that + 1 (after timing). Few, so each worker computes their float64 references once
#: (momtune.worker.ReferenceCache); two, so consecutive trials see other inputs.
INPUT_SETS = 2


def trial_seed(seed: int, number: int) -> int:
    """The check run's input seed of trial ``number`` of a search with ``seed``."""
    return (seed * 1_000_003 + (number % INPUT_SETS) * 7919 + 17) % (2**31 - 1)


@dataclass
class SearchOptions:
    trials: int = 20
    timeout_s: float | None = None  # per study: no new trials after this many seconds
    sampler: str = "tpe"
    storage: str = "sqlite:///momtune.db"
    study_prefix: str | None = None
    workers: int | None = None  # compile workers on a GPU (default min(cores, 8)); interpreter: none unless given
    seed: int = 0
    space_dir: str | None = None
    trial_timeout_s: float | None = None  # default 120 s on a GPU, 300 s in the interpreter
    retime: int = 3
    rounds: int | None = None  # interleaved re-timing rounds (default 5 GPU, 2 interpreter)
    heartbeat_s: int = 10
    devices: Sequence[int] | None = None  # GPU indices to benchmark on (None: every visible GPU); without a
    # GPU, each listed device is one more interpreter worker on the same studies (tests the scheduling)
    transfer: bool = True  # pattern search: the winners of the template's other studies on this GPU and the
    # space's [[starts]] first


@dataclass
class StudyResult:
    study: str
    template: str
    shape: dict[str, int]
    dtype: str
    interpreter: bool
    trials: int
    by_status: dict[str, int]
    winner: dict[str, Any] | None
    winner_ms: float | None
    default_ms: float | None
    floor_ms: float | None
    stopped: str = ""
    default_kept: dict[str, Any] | None = None  # the best config, within noise of the default (kept)
    # median ms per trial of this run's benchmarked trials in each phase of the benchmark worker
    # (inputs, reference, first_run, check, timing; momtune.worker), and how many trials that is
    phases_ms: dict[str, float] | None = None
    phase_trials: int = 0


@dataclass
class _Ctx:
    """One study being searched."""

    study: Any
    sampler: Any
    spec: str
    space: SearchSpace
    shape: dict[str, int]
    dtype: str
    valid: list[dict[str, Any]]
    exhaustive: bool
    deadline: float
    rng: random.Random
    in_flight: InFlight
    lock: threading.Lock = field(default_factory=threading.Lock)
    invalid_streak: int = 0
    stopped: str = ""
    pattern: Any = None  # momtune.pattern.PatternSearch of this study (--sampler pattern)
    learnt: list[dict[str, Any]] = field(default_factory=list)  # other studies' winners (Engine._learnt_starts)
    phases: list[dict[str, float]] = field(default_factory=list)  # benchmark worker phases of this run's trials


class Engine:
    """Worker processes and storage shared by the studies of one ``momtune search``."""

    def __init__(self, options: SearchOptions, reporter: Reporter | None = None) -> None:
        self.o = options
        self.reporter = reporter or Reporter()
        self.interpreter = prepare_environment()
        self.benchers: list[Worker] = []
        self.pool: WorkerPool | None = None
        self.storage: Any = None
        self.info: dict[str, Any] = {}
        self.peaks: dict[str, Any] | None = None  # this GPU's measured copy B/s and bf16 FLOP/s

    def start(self) -> None:
        import optuna

        from .study import open_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        if self.o.sampler not in SAMPLERS:
            make_sampler(self.o.sampler, 0, 1)  # raises with the accepted names
        self.storage = open_storage(self.o.storage, heartbeat_s=self.o.heartbeat_s)
        env = {"TRITON_INTERPRET": "1"} if self.interpreter else {}
        if self.interpreter:  # nothing to compile; explicit --workers still pre-run candidates (tests the pipeline)
            self.benchers = [Worker("cpu", env, f"momtune-bench-cpu{d}") for d in (self.o.devices or [0])]
            if self.o.workers:
                self.pool = WorkerPool([Worker("cpu", env, f"momtune-compile{k}") for k in range(self.o.workers)])
        else:
            import torch

            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            if self.o.devices:
                missing = [d for d in self.o.devices if d >= len(ids)]
                if missing:
                    raise InputError(f"--devices: GPU {missing[0]} is not visible; this machine shows "
                                     f"{len(ids)} (0 .. {len(ids) - 1}), or 'all'")
                ids = [ids[d] for d in self.o.devices]
            self.benchers = [Worker("cuda", {**env, "CUDA_VISIBLE_DEVICES": i}, f"momtune-bench-gpu{i}") for i in ids]
            n = self.o.workers or min(os.cpu_count() or 1, 8)
            self.pool = WorkerPool([Worker("cuda", {**env, "CUDA_VISIBLE_DEVICES": ids[k % len(ids)]},
                                           f"momtune-compile{k}") for k in range(max(1, n))])
        start_all(self.benchers + (self.pool.workers if self.pool else []))
        self.info = self.benchers[0].info
        if not self.interpreter:  # floors from this GPU's own peaks, measured once per run
            reply = self.benchers[0].call({"op": "peaks"}, 300.0)
            if reply.get("status") == "ok":
                self.peaks = reply["peaks"]
                self.reporter.note(f"peaks measured on {self.peaks['gpu']}: "
                                   f"{self.peaks['bytes_per_s'] / 1e12:.2f} TB/s copy, "
                                   f"{self.peaks['flops_per_s'] / 1e12:.0f} TFLOP/s bf16 GEMM (the floors use them)")
            else:
                self.reporter.note(f"warning: measuring the GPU's peaks failed ({reply.get('reason')}); "
                                   "floors use the nominal H100 SXM peaks")
        kinds = sorted({str(w.info.get("gpu")) for w in self.benchers})
        if len(kinds) > 1:  # a study is one GPU model's: its times would mix
            self.close()
            raise InputError(f"--devices: the GPUs differ ({', '.join(kinds)}); search one model at a time "
                             "(--devices with the indices of one model)")

    def close(self) -> None:
        for w in self.benchers:
            w.close()
        if self.pool is not None:
            self.pool.close()

    @property
    def trial_timeout(self) -> float:
        return self.o.trial_timeout_s or (300.0 if self.interpreter else 120.0)

    def timing(self, retime: bool = False) -> TimingOptions:
        """Interpreter runs are slow: 2 timed calls per trial, 1 per candidate and round when re-timing."""
        if self.interpreter:
            return TimingOptions(interpreter=True, runs=1 if retime else 2, rounds=self.o.rounds or 3)
        return TimingOptions(interpreter=False, rounds=self.o.rounds or 5)

    # ------------------------------------------------------------------------------------------
    def run_study(self, spec: str, space: SearchSpace, shape: dict[str, int], dtype: str,
                  shape_set: str) -> StudyResult:
        import optuna
        import torch

        from .provenance import gpu_slug

        t = resolve_template(spec)
        gpu = str(self.info.get("gpu", "unknown"))
        name = study_name(t.name, gpu_slug(gpu), shape, t.shape_keys, dtype, self.o.study_prefix)
        name = self._versioned(name, t.source_hash())
        sampler = pinning_sampler(make_sampler(self.o.sampler, self.o.seed, self.o.trials))
        study = optuna.create_study(study_name=name, storage=self.storage, load_if_exists=True,
                                    direction="minimize", sampler=sampler)
        valid = space.enumerate(shape)
        default = space.default_config()
        valid = [default] + [c for c in valid if c != default] if default in valid else valid
        flops, nbytes = t.cost(shape, getattr(torch, dtype))
        attrs = {"template": t.name, "template_spec": spec, "shape": dict(shape),
                 "shape_key": shape_key(shape, t.shape_keys, dtype), "dtype": dtype, "shape_set": shape_set, "gpu": gpu, "interpreter": self.interpreter, "sampler": self.o.sampler,
                 "timing_mode": "interpreter" if self.interpreter else
                 ("cuda graph replay" if getattr(t, "cuda_graph", False) else "eager launches"),
                 "space_size": len(valid), "provenance": {**self.info, "source_hash": t.source_hash()},
                 "default_config": default, "default_valid": default in valid,
                 "floor_ms": floor_ms(flops, nbytes, self.peaks),
                 "floor_peak": dict(self.peaks or NOMINAL_PEAKS)}
        for k, v in attrs.items():
            study.set_user_attr(k, v)
        deadline = time.monotonic() + self.o.timeout_s if self.o.timeout_s else math.inf
        ctx = _Ctx(study, sampler, spec, space, dict(shape), dtype, valid,
                   self.o.sampler in ("grid", "exhaustive", "pattern"),
                   deadline, random.Random(f"{self.o.seed}:{name}:{os.getpid()}"),
                   InFlight(self.storage, self.o.heartbeat_s))
        if self.o.sampler == "pattern":
            ctx.learnt = self._learnt_starts(t, gpu, name, default)
        self._adopt_heartbeat(ctx, announce=True)
        optuna.storages.fail_stale_trials(study)
        c = count(trials_of(study))
        self.reporter.study_started(name, self.o.trials, len(valid), self.interpreter, c.done, self.o.timeout_s)
        ctx.in_flight.start()
        try:
            if len(self.benchers) == 1:
                self._drive(ctx, self.benchers[0])
            else:  # one driver per GPU, all on this study
                errors: list[BaseException] = []

                def drive(w: Worker) -> None:
                    try:
                        self._drive(ctx, w)
                    except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                        errors.append(exc)
                        ctx.stopped = ctx.stopped or f"error: {exc}"

                drivers = [threading.Thread(target=drive, args=(w,), daemon=True) for w in self.benchers]
                for d in drivers:
                    d.start()
                for d in drivers:
                    while d.is_alive():  # join with a timeout: Ctrl-C stays deliverable
                        d.join(0.5)
                if errors:
                    raise errors[0]
        except BaseException:
            ctx.stopped = "interrupted"
            ctx.in_flight.release()
            raise
        finally:
            ctx.in_flight.stop()
        result = self._finish(ctx, name, t.name)
        self.reporter.study_finished(result)
        return result

    def _adopt_heartbeat(self, ctx: _Ctx, announce: bool = False) -> None:
        """Every process on a study beats and judges staleness with the heartbeat the study was
        first searched with (a study attr): a process with a shorter grace would fail another's
        live trials and lose their measurements."""
        stored = ctx.study.user_attrs.get("heartbeat_s")
        if not isinstance(stored, int) or isinstance(stored, bool) or stored < 1:
            ctx.study.set_user_attr("heartbeat_s", self.o.heartbeat_s)
            stored = ctx.study.user_attrs.get("heartbeat_s", self.o.heartbeat_s)  # a concurrent first writer wins
        if announce and stored != self.o.heartbeat_s:
            self.reporter.note(f"{ctx.study.study_name}: heartbeat {stored} s, the one the study was started with, "
                               f"not --heartbeat {self.o.heartbeat_s}: every process on a study uses one")
        ctx.in_flight.heartbeat_s = stored
        self.storage.heartbeat_interval, self.storage.grace_period = stored, 3 * stored

    def _drive(self, ctx: _Ctx, bencher: Worker) -> None:
        import optuna

        last_stale = time.monotonic()
        batch = 1 if self.pool is None else len(self.pool.workers)
        if self.o.sampler in ("tpe", "pattern"):
            # TPE and pattern search learn only between batches (within one, TPE's constant liar only
            # spreads the suggestions, and pattern search orders its candidates from results not in
            # yet): 11 trials asked as one batch of 16 are a random search, or the default's
            # neighbourhood measured blind (the H200's pattern studies of session 10)
            batch = min(batch, max(2, self.o.trials // 4))
        while True:
            if time.monotonic() - last_stale > ctx.in_flight.heartbeat_s:
                self._adopt_heartbeat(ctx)
                optuna.storages.fail_stale_trials(ctx.study)
                last_stale = time.monotonic()
            trials = trials_of(ctx.study)
            c = count(trials)
            claimed = {str(t.user_attrs["claim"]) for t in trials
                       if "claim" in t.user_attrs and (t.state.name == "RUNNING" or is_done(t))}
            valid_keys = {canonical(v) for v in ctx.valid}
            if ctx.stopped:
                return
            if c.done >= self.o.trials:
                ctx.stopped = ctx.stopped or "trials reached"
                return
            if valid_keys <= c.measured:
                ctx.stopped = "every valid config measured"
                return
            if time.monotonic() > ctx.deadline:
                ctx.stopped = "timeout"
                return
            if ctx.invalid_streak > max(200, 20 * self.o.trials):
                ctx.stopped = "the sampler keeps suggesting invalid configs"
                return
            room = self.o.trials - c.done - c.running
            if room <= 0 or (ctx.exhaustive and valid_keys <= claimed):
                time.sleep(min(1.0, ctx.in_flight.heartbeat_s / 4))  # others are finishing the last trials
                continue
            free = len(valid_keys - claimed) if ctx.exhaustive else batch
            self._run_batch(ctx, bencher, min(batch, room, free))

    def _versioned(self, name: str, source_hash: str) -> str:
        """``name``, or ``name@<source hash>`` when a study of that name holds results of another
        version of the template's kernels (its recorded source hash differs): resuming it would mix
        two kernels' timings and reuse the old one's results as the new one's. The old study stays
        as it was; ``momtune export`` takes, per shape, the studies of the template's current
        source."""
        import optuna

        try:
            old = optuna.load_study(study_name=name, storage=self.storage)
        except KeyError:
            return name
        recorded = (old.user_attrs.get("provenance") or {}).get("source_hash")
        done = count(trials_of(old)).done
        if recorded in (None, source_hash) or not done:
            return name
        versioned = f"{name}@{source_hash[:12]}"
        self.reporter.note(f"{name}: its {done} trials measured another version of the "
                           f"template's kernels (source {recorded[:12]}, now {source_hash[:12]}); this search "
                           f"uses {versioned}")
        return versioned

    def _ask(self, ctx: _Ctx) -> tuple[Any, dict[str, Any] | None]:
        """A new trial and its config (None: nothing left to claim; told already)."""
        with Shield():  # a trial is never created without being tracked (Ctrl-C waits for this)
            trial = ctx.study.ask()
            ctx.in_flight.add(trial._trial_id)
        if ctx.exhaustive:  # grid: every config in order; pattern: in the order of a local search
            config = claim_config(ctx.study, trial, self._pattern_order(ctx) if self.o.sampler == "pattern"
                                  else ctx.valid, ctx.rng, ctx.lock)
            if config is None:
                self._tell(ctx, trial, None, {"status": "invalid_config",
                                              "reason": "no unclaimed valid config left (claimed concurrently)"})
                return trial, None
            ctx.sampler.pin(trial.number, config)
        elif ctx.valid and canonical(ctx.valid[0]) not in {
                str(t.user_attrs.get("claim")) for t in trials_of(ctx.study) if t.number != trial.number
                and (t.state.name == "RUNNING" or is_done(t))}:
            default = claim_config(ctx.study, trial, ctx.valid[:1], ctx.rng, ctx.lock, rounds=1)
            if default is not None:
                ctx.sampler.pin(trial.number, default)
        elif ctx.invalid_streak >= INVALID_FALLBACK:  # the sampler keeps missing the constraints
            measured = count(trials_of(ctx.study)).measured
            free = [c for c in ctx.valid if canonical(c) not in measured]
            if free:
                ctx.sampler.pin(trial.number, ctx.rng.choice(free))
        config = {p.name: trial.suggest_categorical(p.name, list(p.choices)) for p in ctx.space.parameters.values()}
        trial.set_user_attr("claim", canonical(config))
        ok, why = ctx.space.is_valid(config, ctx.shape)
        if not ok:
            ctx.invalid_streak += 1
            self._tell(ctx, trial, config, {"status": "invalid_config", "reason": why})
            return trial, None
        ctx.invalid_streak = 0
        return trial, config

    def _learnt_starts(self, t: Any, gpu: str, name: str, default: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The re-timed winners of this template's other studies on this GPU and this version of its
        kernels (any shape, any study prefix), the largest speed-up over their own default first, at
        most LEARNT_STARTS: the pattern search measures them right after the default, before the
        space's ``[[starts]]`` (a config that won at one shape is the best guess at the next: on the
        H200 the recurrence's optimum at N 49152 had no neighbour within 20% of it, so a local
        search from the default never reached it). Configs of a reduced space take this space's
        defaults for the rest; one not valid here is skipped by the search. ``--no-transfer``: none."""
        if not self.o.transfer:
            return []
        import optuna

        found: list[tuple[float, str, dict[str, Any]]] = []
        source = t.source_hash()
        for s in optuna.get_all_study_summaries(self.storage, include_best_trial=False):
            a = s.user_attrs
            if s.study_name == name or a.get("template") != t.name or str(a.get("gpu")) != gpu:
                continue
            if (a.get("provenance") or {}).get("source_hash") != source:
                continue
            w, d = a.get("winner") or {}, a.get("default_time_ms")
            if not (w.get("retimed") and isinstance(w.get("config"), Mapping) and isinstance(d, (int, float))
                    and isinstance(w.get("time_ms"), (int, float)) and d > 0 and math.isfinite(w["time_ms"])):
                continue
            config = {k: w["config"].get(k, v) for k, v in default.items()}
            found.append((float(w["time_ms"]) / float(d), canonical(config), config))
        out: list[dict[str, Any]] = []
        for _, key, config in sorted(found, key=lambda f: (f[0], f[1])):
            if key != canonical(default) and all(key != canonical(c) for c in out):
                out.append(config)
        if out:
            self.reporter.note(f"  {name}: {min(len(out), LEARNT_STARTS)} winner(s) of other studies measured first "
                               "(--no-transfer: none)")
        return out[:LEARNT_STARTS]

    def _pattern_order(self, ctx: _Ctx) -> list[dict[str, Any]]:
        """The unmeasured valid configs, best candidate first (momtune.pattern), from the study's trials."""
        trials = trials_of(ctx.study)
        times: dict[str, float] = {}
        walls: set[str] = set()  # configs out of per-block resources: the search bridges them
        for t in trials:
            if t.state.name == "COMPLETE" and t.user_attrs.get("status") == "ok" and "config" in t.user_attrs:
                key = canonical(t.user_attrs["config"])
                times[key] = min(times.get(key, math.inf), float(t.value))
            elif t.user_attrs.get("status") == "out_of_resources" and "config" in t.user_attrs:
                walls.add(canonical(t.user_attrs["config"]))
        if ctx.pattern is None:
            default = ctx.space.default_config()
            fallbacks = [{**default, **fb} for fb in getattr(resolve_template(ctx.spec), "fallbacks", ())
                         if set(fb) <= set(default)]
            # --no-transfer (sampler comparisons): no configs known from elsewhere, neither other
            # studies' winners nor the space's [[starts]] (the recurrence's holds the H200's exhaustive
            # winner): the search is measured, not a lookup; the template's fallbacks stay
            starts = [*ctx.learnt, *ctx.space.starts] if self.o.transfer else []
            ctx.pattern = pattern.PatternSearch(ctx.space, ctx.valid, default, self.o.seed,
                                                starts=starts, fallbacks=fallbacks)
        claimed = sum(t.state.name == "RUNNING" for t in trials)
        return ctx.pattern.candidates(times, count(trials).measured, limit=claimed + 64, walls=walls)

    def _run_batch(self, ctx: _Ctx, bencher: Worker, n: int) -> None:
        """Ask until ``n`` configs to run (invalid suggestions are told at once and do not take a
        slot, so a sparse space still keeps every compile worker busy), compile them in parallel
        and benchmark each one as soon as its compile is done: one slow compile delays only itself."""
        todo: list[tuple[Any, dict[str, Any]]] = []
        repeats: list[tuple[Any, dict[str, Any]]] = []  # suggested twice within this batch
        filled = asks = 0
        while filled < n and asks < (INVALID_FALLBACK + 1) * n and time.monotonic() <= ctx.deadline:
            asks += 1
            trial, config = self._ask(ctx)
            if config is None:
                if ctx.exhaustive:
                    break  # nothing left to claim (exhaustive suggestions are valid by construction)
                continue
            filled += 1
            prior = measured_result(trials_of(ctx.study), canonical(config))
            if prior is not None:
                self._tell(ctx, trial, config, _result_of(prior.user_attrs), cached=True)
            elif any(canonical(c) == canonical(config) for _, c in todo):
                repeats.append((trial, config))
            else:
                todo.append((trial, config))
        base = {"template": ctx.spec, "shape": ctx.shape, "dtype": ctx.dtype}

        deferred: list[tuple[Any, dict[str, Any]]] = []

        def bench(trial: Any, config: dict[str, Any], early: dict[str, Any] | None, contended: bool = False) -> None:
            # compiled, but the study's time is up: not run (a failed compile is still recorded);
            # the default still runs: the winner is judged against it
            if (early is None and time.monotonic() > ctx.deadline and count(trials_of(ctx.study)).ok
                    and canonical(config) != canonical(ctx.space.default_config())):
                self._not_run(ctx, trial, config)
                return
            seed = trial_seed(self.o.seed, trial.number)
            request = {**base, "op": "trial", "config": config, "seed": seed, "timing": self.timing().__dict__}
            reply = early or bencher.call(request, self.trial_timeout)
            if contended and reply.get("status") == "out_of_memory":
                # the compile workers run the batch's other configs on the same device meanwhile
                # (H200, session 13: 38 of 40 configs of the recurrence backward at N 196,608,
                # the default among them, out of memory while 16 compile runs held 8-18 GB each):
                # no attempt of its own until the batch's compiles are done
                self.reporter.note(f"  trial {trial.number}: {reply.get('reason')}; while the batch's compiles "
                                   "ran: run again once they are done")
                deferred.append((trial, config))
                return
            attempts = 1
            while attempts < RETRIED_ATTEMPTS.get(reply.get("status"), 0) and not ctx.stopped:
                # not the config's fault until it happens again (see RETRIED_ATTEMPTS)
                self.reporter.note(f"  trial {trial.number}: {reply.get('reason')}; running it again")
                reply = bencher.call(request, self.trial_timeout)
                attempts += 1
            if reply.get("status") in RETRIED_ATTEMPTS and attempts > 1:
                reply["reason"] = f"{reply.get('reason')}, on each of {attempts} attempts"
            reply["attempts"] = attempts
            reply["seed"] = seed
            reply["device"] = bencher.name
            self._tell(ctx, trial, config, reply)

        if self.pool is not None and todo:
            # each compile run on its trial's own inputs: ragged segments drawn from the seed set
            # integer arguments Triton specialises on (H200, session 13: seed-0 compile runs built
            # recurrence_bwd kernels no trial ran; trials then compiled 2-6 s in the benchmark worker)
            requests = [{**base, "op": "compile", "config": cfg, "seed": trial_seed(self.o.seed, trial.number)}
                        for trial, cfg in todo]
            for i, reply in self.pool.imap_unordered(requests, self.trial_timeout):
                failed = reply.get("status") in COMPILE_FAILURES
                bench(*todo[i], reply if failed else None, contended=len(todo) > 1)
            for trial, config in deferred:  # the compile workers are idle (and hold no device memory)
                bench(trial, config, None)
        else:
            for trial, config in todo:
                bench(trial, config, None)
        for trial, config in repeats:
            prior = measured_result(trials_of(ctx.study), canonical(config))
            self._tell(ctx, trial, config, _result_of(prior.user_attrs) if prior is not None else
                       {"status": "error", "reason": "repeated suggestion whose first run was not recorded"},
                       cached=True)

    def _not_run(self, ctx: _Ctx, trial: Any, config: dict[str, Any]) -> None:
        """A trial of a batch whose turn came after the study's --timeout (and after its first
        result): told FAIL without a status, so it is no result (momtune.study.is_done), its config
        is free for a later run and --timeout holds to within one trial."""
        from optuna.trial import TrialState

        with Shield():
            try:
                trial.set_user_attr("reason", "not run: the study's --timeout came first")
                ctx.study.tell(trial, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001 - failed by another process already: no result either way
                pass
            finally:
                ctx.in_flight.discard(trial._trial_id)
        ctx.stopped = ctx.stopped or "timeout"

    def _tell(self, ctx: _Ctx, trial: Any, config: dict[str, Any] | None, reply: Mapping[str, Any],
              cached: bool = False) -> None:
        from optuna.trial import TrialState

        if ctx.stopped == "interrupted":  # the reply of a killed worker: not a result
            return
        status = str(reply.get("status", "error"))
        attrs: dict[str, Any] = {"reason": str(reply.get("reason", "")), "cached": cached,
                                 "worker": f"{os.uname().nodename}:{os.getpid()}"}
        if config is not None:
            attrs["config"] = config
        for k in ("time_ms", "max_abs_err", "max_rel_err", "rel_norm_err", "spread", "seed", "check", "attempts"):
            v = reply.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                attrs[k] = v
            elif k == "check" and isinstance(v, str) and v:
                attrs[k] = v  # the gate's failure kind (momtune.gate.KINDS)
        if isinstance(reply.get("device"), str):
            attrs["device"] = reply["device"]  # the benchmark worker (one per GPU) that measured it
        phases = reply.get("phases_ms")
        if isinstance(phases, dict) and not cached:  # where the benchmark worker's time went (ms)
            attrs["phases_ms"] = {str(k): float(v) for k, v in phases.items()
                                  if isinstance(v, (int, float)) and math.isfinite(v)}
            ctx.phases.append(attrs["phases_ms"])
        if status == "ok" and "time_ms" not in attrs:
            status, attrs["reason"] = "error", f"the worker said ok without a finite time ({reply.get('time_ms')!r})"
        # Written in this order: the other attributes, then the status, then the state. Each is its
        # own transaction, so a process killed part-way leaves a RUNNING trial that the heartbeat
        # fails; without a status (or with an "ok" it never told) it is lost, and its config runs
        # again (momtune.study.is_done).
        attrs["status"] = status
        lost = False
        with Shield():  # Ctrl-C waits until the trial is written
            try:
                for k, v in attrs.items():
                    trial.set_user_attr(k, v)
                if status == "ok":
                    ctx.study.tell(trial, attrs["time_ms"])
                elif status == "invalid_config":
                    ctx.study.tell(trial, state=TrialState.PRUNED)
                else:
                    ctx.study.tell(trial, state=TrialState.FAIL)
            except Exception:
                # another process failed this live trial (its heartbeat grace ran out, e.g. a
                # machine stalled): the result is lost, not an error of the search; the config
                # is unclaimed again and runs again
                if not ctx.study._storage.get_trial(trial._trial_id).state.is_finished():
                    raise
                lost = True
            finally:
                ctx.in_flight.discard(trial._trial_id)
        if lost:
            self.reporter.note(f"  trial {trial.number}: another process marked it failed (heartbeat grace "
                               "passed) before its result was saved; the result is dropped and its config "
                               "runs again")
            return
        if status != "invalid_config":
            c = count(trials_of(ctx.study))
            best = ctx.study.best_value if c.ok else None
            self.reporter.trial_done(ctx.study.study_name, trial.number, config or {}, status, attrs.get("time_ms"),
                                     attrs["reason"], cached, c.done, self.o.trials, best, c.by_status)

    # ------------------------------------------------------------------------------------------
    def _finish(self, ctx: _Ctx, name: str, template: str) -> StudyResult:
        trials = trials_of(ctx.study)
        c = count(trials)
        attrs = ctx.study.user_attrs
        res = StudyResult(name, template, ctx.shape, ctx.dtype, self.interpreter, c.done, c.by_status, None, None,
                          attrs.get("default_time_ms"), attrs.get("floor_ms"), ctx.stopped)
        res.phases_ms, res.phase_trials = phase_medians(ctx.phases)
        if not c.ok:
            return res
        old = attrs.get("winner")
        if old and old.get("trials") == c.done and attrs.get("default_time_ms") is not None:
            res.winner, res.winner_ms, res.default_kept = old["config"], old["time_ms"], old.get("default_kept")
            return res

        def retime(configs: Sequence[Mapping[str, Any]]) -> list[Timing] | None:
            reply = self.benchers[0].call({"op": "retime", "template": ctx.spec, "shape": ctx.shape,
                                           "dtype": ctx.dtype, "configs": list(configs), "seed": self.o.seed,
                                           "timing": self.timing(retime=True).__dict__},
                                          self.trial_timeout * (1 + len(configs)))
            if reply.get("status") == "ok":
                for err in reply.get("errors", []):  # a config whose timing raised is timed as inf
                    self.reporter.note(f"  re-timing: {err}")
                return [Timing(*x) for x in reply["times"]]
            self.reporter.note(f"  re-timing failed ({reply.get('status')}: {reply.get('reason')}); "
                               "using the trials' times")
            return None

        default = ctx.space.default_config()
        winner, default_ms = choose_winner(trials, default, self.o.retime, c.done, retime,
                                           default_valid=default in ctx.valid)
        if winner is not None:
            ctx.study.set_user_attr("winner", winner)
            ctx.study.set_user_attr("default_time_ms", default_ms)
            res.winner, res.winner_ms, res.default_ms = winner["config"], winner["time_ms"], default_ms
            res.default_kept = winner.get("default_kept")
        return res


def phase_medians(rows: Sequence[Mapping[str, float]]) -> tuple[dict[str, float] | None, int]:
    """(median ms per phase, number of trials) over the trials' ``phases_ms``; a phase a trial did
    not reach (a wrong answer stops before timing) counts as 0 for it."""
    if not rows:
        return None, 0
    names = sorted({k for r in rows for k in r}, key=lambda k: PHASES.index(k) if k in PHASES else len(PHASES))
    return {k: statistics.median(float(r.get(k, 0.0)) for r in rows) for k in names}, len(rows)


PHASES = ("inputs", "reference", "first_run", "check", "timing")


def _result_of(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: attrs[k] for k in ("status", "reason", "time_ms", "max_abs_err", "max_rel_err") if k in attrs}


def search(templates: Sequence[str], shape_set: str, options: SearchOptions,
           reporter: Reporter | None = None) -> list[StudyResult]:
    """Search every shape of ``shape_set`` for each template spec; returns one result per study."""
    if options.trials < 1:
        raise InputError(f"--trials: must be >= 1, got {options.trials}")
    engine = Engine(options, reporter)
    plans = []
    for spec in templates:  # resolve and validate everything before starting workers
        t = resolve_template(spec)
        space = load_space(t.name, options.space_dir, template=t)
        if shape_set not in space.shape_sets:
            raise InputError(f"--shapes: template {t.name!r} has no shape set {shape_set!r}; "
                             f"its sets: {', '.join(space.shape_sets)}")
        plans.append((spec, space))
    for spec, space in plans:
        dtype = space.shape_sets[shape_set][0]
        if engine.interpreter and dtype in INTERPRETER_WRONG_DTYPES:
            raise InputError(f"--shapes {shape_set}: template {resolve_template(spec).name!r} runs it in {dtype}, "
                             "and without a GPU the kernels run in Triton's interpreter, whose bfloat16 dots are "
                             "wrong (a search would check and tune garbage); use a float32 or float16 shape set "
                             "(--shapes tiny) or a CUDA GPU")
    if engine.interpreter and shape_set != "tiny":
        engine.reporter.note(f"[yellow]no GPU: running shape set {shape_set!r} in the Triton interpreter "
                             "(slow; use --shapes tiny)[/]")
    engine.reporter.plan(sum(len(space.shape_sets[shape_set][1]) for _, space in plans))
    results: list[StudyResult] = []
    engine.start()
    try:
        for spec, space in plans:
            dtype, shapes = space.shape_sets[shape_set]
            for shape in shapes:
                results.append(engine.run_study(spec, space, shape, dtype, shape_set))
    except Exception as exc:
        failure = storage_failure(options.storage, exc)
        if failure is None:
            raise
        raise failure from None
    finally:
        engine.close()
        engine.reporter.close()
    return results
