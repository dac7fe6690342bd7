"""Optuna storage and study bookkeeping shared by search, export and report.

Study names: ``[{prefix}/]{template}:{gpu_slug}:{shape_key}`` (docs/DATA_FORMATS.md).
Counting: a trial is *done* when it is COMPLETE, or FAIL with a ``status`` attr (a recorded
failure). FAIL without ``status`` is a trial lost with its process (failed by Optuna's heartbeat
check): it does not count and its config may run again. PRUNED trials (invalid configs) do not
count. Several processes may work on one study: each trial first *claims* its config (user
attr ``claim``) and gives way when another live trial claims the same one, so exhaustive
searches never run a config twice.
"""
from __future__ import annotations

import random
import re
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, StorageError
from .space import canonical

DONE_STATES = ("COMPLETE", "FAIL")
SAMPLERS = ("tpe", "random", "grid", "exhaustive", "pattern")


def shape_key(shape: Mapping[str, int], keys: Sequence[str], dtype: str) -> str:
    return "-".join([f"{k}{shape[k]}" for k in keys] + [dtype])


def study_name(template: str, gpu_slug: str, shape: Mapping[str, int], keys: Sequence[str], dtype: str,
               prefix: str | None = None) -> str:
    name = f"{template}:{gpu_slug}:{shape_key(shape, keys, dtype)}"
    return f"{prefix}/{name}" if prefix else name


def absolute_url(url: str) -> str:
    """Make a relative SQLite path absolute (``sqlite:///momtune.db`` -> ``sqlite:////cwd/momtune.db``)."""
    m = re.match(r"^(sqlite(?:\+\w+)?:///)(.+)$", url)
    if m and not m.group(2).startswith("/") and m.group(2) != ":memory:":
        return m.group(1) + str(Path(m.group(2)).resolve())
    return url


def safe_url(url: str) -> str:
    """``url`` for messages: a password in it is replaced by ``***``."""
    return re.sub(r"^([\w+.-]+://[^/:@]*):[^@/]*@", r"\1:***@", url)


def _password(url: str) -> str | None:
    m = re.match(r"^[\w+.-]+://[^/:@]*:([^@/]*)@", url)
    return m.group(1) if m and m.group(1) else None


def scrub(text: str, url: str) -> str:
    """``text`` (an error message about ``url``) without the URL's password, raw or quoted."""
    from urllib.parse import unquote

    pw = _password(url)
    for secret in {pw, unquote(pw)} if pw else ():
        if secret:
            text = text.replace(secret, "***")
    return text


POSTGRES_DRIVERS = (("psycopg2", "psycopg2"), ("psycopg", "psycopg"), ("pg8000", "pg8000"))


def with_driver(url: str) -> str:
    """A ``postgresql://`` URL (SQLAlchemy's default driver, psycopg2) with a PostgreSQL driver
    that is installed; other URLs as given. No driver installed: a StorageError saying what to
    install."""
    import importlib.util

    m = re.match(r"^(postgres(?:ql)?)://", url)
    if not m:
        return url
    for module, driver in POSTGRES_DRIVERS:
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://" + url[m.end():]
    raise StorageError(f"storage {safe_url(url)!r}: no PostgreSQL driver is installed; "
                       "`pip install momtune[postgres]` (psycopg2-binary), or psycopg or pg8000")


def storage_failure(url: str, exc: BaseException) -> StorageError | None:
    """A StorageError naming the storage and the database's own reason (disk full, read-only,
    server gone) for a failed read or write of the storage, or None when ``exc`` is not one.
    Optuna wraps a failed commit in a StorageInternalError that blames "invalid data ... exceeding
    max length"; the driver's error underneath says what happened."""
    names = {"StorageInternalError", "OperationalError", "DatabaseError", "InterfaceError", "DisconnectionError"}
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if not any(type(x).__name__ in names for x in chain):
        return None
    root = chain[-1]
    detail = (str(getattr(root, "orig", None) or root).splitlines() or [type(root).__name__])[0]
    detail = re.sub(r"^\(\S+\)\s*", "", detail)  # SQLAlchemy's "(sqlite3.OperationalError) " prefix
    where = sqlite_path(url)
    hint = ""
    if re.search(r"disk is full|No space left", detail, re.I):
        hint = f"; free space on the disk of {where or 'the server'}"
    elif re.search(r"readonly|read-only|read only", detail, re.I):
        hint = f"; make {where or 'the database'} writable, or pass another --storage"
    return StorageError(f"storage {safe_url(url)!r}: the database refused a write or read: "
                        f"{scrub(detail, url)} ({type(root).__name__}){hint}; trials saved before this are kept")


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite storage URL (resolved), None for other URLs and ``:memory:``."""
    m = re.match(r"^sqlite(?:\+\w+)?:///(.+?)(\?.*)?$", absolute_url(url))
    return None if not m or m.group(1) == ":memory:" else Path(m.group(1)).resolve()


def open_storage(url: str, heartbeat_s: int | None = None, read_only: bool = False) -> Any:
    """An Optuna RDBStorage for any SQLAlchemy URL (SQLite, PostgreSQL, MySQL ...).

    ``read_only`` (export, report, verify): a SQLite file must exist (a mistyped path is an error,
    not a new empty database) and no tables are created (a SQLite file that is not an Optuna
    storage is refused, not given Optuna's tables)."""
    import inspect

    import optuna

    given = url
    url = with_driver(absolute_url(url))
    shown = safe_url(given)
    extra: dict[str, Any] = {}
    if read_only:
        m = re.match(r"^sqlite(?:\+\w+)?:///(.+?)(\?.*)?$", url)
        if m and m.group(1) != ":memory:" and not Path(m.group(1)).is_file():
            raise StorageError(f"storage {shown!r}: the SQLite file {m.group(1)} does not exist")
        if "skip_table_creation" in inspect.signature(optuna.storages.RDBStorage).parameters:
            extra["skip_table_creation"] = True
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}
    else:
        kwargs["pool_pre_ping"] = True
    last: Exception | None = None
    for attempt in range(3):  # several processes creating the tables of a fresh database may collide
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s,
                                              grace_period=None if heartbeat_s is None else 3 * heartbeat_s,
                                              **extra)
        except Exception as exc:  # noqa: BLE001 - driver missing, bad URL, server down
            last = exc
            if "psycopg" in str(exc) or "No module named" in str(exc) or read_only:
                break
            time.sleep(0.5 + attempt)
    text = scrub(str(last).splitlines()[0] if last is not None and str(last) else "", url)
    hint = " (PostgreSQL needs `pip install psycopg2-binary`)" if "psycopg" in text else ""
    if read_only and not hint:
        cause = getattr(last, "__cause__", None) or getattr(last, "__context__", None)
        detail = scrub(str(cause).splitlines()[0], url) if cause is not None and str(cause) else text
        raise StorageError(f"storage {shown!r} is not an Optuna storage, or cannot be read: {detail}; "
                           "nothing was written to it") from None
    raise StorageError(f"storage {shown!r} cannot be opened: {type(last).__name__}: {text}{hint}") from None


def study_names(storage: Any) -> list[str]:
    import optuna

    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def is_done(t: Any) -> bool:
    """A trial with a result: COMPLETE, or FAIL with the failure the search recorded.

    The search writes a trial's ``status`` after its other attributes and before its state, so a
    process killed in between leaves a RUNNING trial with a status, which the heartbeat then
    fails. A failure kind is still that config's result; an "ok" (or "invalid_config", told as
    PRUNED) on a FAIL trial is not, and the config is run again."""
    if t.state.name == "COMPLETE":
        return True
    return t.state.name == "FAIL" and t.user_attrs.get("status") not in (None, "ok", "invalid_config")


#: failures that may not be the config's own: the search runs such a trial again in the restarted
#: worker, up to this many attempts in all. "killed" from outside (the OOM killer may have picked the
#: worker for another process's memory); "illegal_memory": CUDA reports a fault at a later
#: synchronisation, so a request can die of the one before it (H200, session 10: a default config
#: failed so after a faulting re-timing); "out_of_memory": the device's memory held by other
#: processes (H200, session 11: 11 configs of an exhaustive sweep at N 196,608 ruled out while the
#: compile workers held their cached blocks)
RETRIED_ATTEMPTS = {"killed": 2, "illegal_memory": 2, "out_of_memory": 2}


def is_config_failure(t: Any) -> bool:
    """A done trial whose failure is the config's own: every recorded failure but one of the
    :data:`RETRIED_ATTEMPTS` kinds with fewer attempts than its retries (a search before session
    10 recorded a single ``illegal_memory`` attempt without running the config again)."""
    if not is_done(t) or t.state.name == "COMPLETE":
        return False
    status = t.user_attrs.get("status")
    if status in RETRIED_ATTEMPTS:
        return int(t.user_attrs.get("attempts", 1) or 1) >= RETRIED_ATTEMPTS[status]
    return True


#: recorded failures that describe the device at the time rather than the config: a later run in
#: the same process (the winner's re-timing) overrules them (H200, session 13: the recurrence
#: backward's default out of memory beside 16 compile workers, then re-timed at 28.55 ms)
DEVICE_STATE_FAILURES = frozenset({"out_of_memory"})


def failure_kinds(trials: Iterable[Any], config: Mapping[str, Any]) -> set[str]:
    """The kinds (statuses) of the failures ``config``'s trials recorded as its own (:func:`is_config_failure`)."""
    from .space import canonical

    key = canonical(config)
    return {str(t.user_attrs.get("status")) for t in trials if is_config_failure(t)
            and isinstance(t.user_attrs.get("config"), Mapping) and canonical(t.user_attrs["config"]) == key}


def trials_of(study: Any) -> list[Any]:
    return list(study._storage.get_all_trials(study._study_id, deepcopy=False))


@dataclass
class Counts:
    done: int
    running: int
    ok: int
    by_status: dict[str, int]
    measured: set[str]  # canonical configs with a done trial


def count(trials: Iterable[Any]) -> Counts:
    c = Counts(0, 0, 0, {}, set())
    for t in trials:
        if t.state.name == "RUNNING":
            c.running += 1
        elif is_done(t):
            c.done += 1
            status = str(t.user_attrs.get("status", "ok"))
            c.by_status[status] = c.by_status.get(status, 0) + 1
            c.ok += status == "ok"
            if "config" in t.user_attrs:
                c.measured.add(canonical(t.user_attrs["config"]))
    return c


def measured_result(trials: Iterable[Any], key: str) -> Any | None:
    """An earlier done trial (not itself cached, if possible) of the config ``key``."""
    found = None
    for t in trials:
        if is_done(t) and "config" in t.user_attrs and canonical(t.user_attrs["config"]) == key:
            if not t.user_attrs.get("cached"):
                return t
            found = found or t
    return found


def _claimed(trials: Iterable[Any], exclude: int) -> set[str]:
    out = set()
    for t in trials:
        if t.number == exclude:
            continue
        live = t.state.name == "RUNNING" or is_done(t)
        if live and "claim" in t.user_attrs:
            out.add(str(t.user_attrs["claim"]))
    return out


def claim_config(study: Any, trial: Any, candidates: Sequence[Mapping[str, Any]], rng: random.Random,
                 lock: threading.Lock, rounds: int = 50) -> dict[str, Any] | None:
    """Claim the first candidate no other live trial claims; None when all are taken.

    Each round writes the claim, then re-reads: a trial that sees another claim of the same config
    gives way (picks another). Of two trials racing, at least one sees the other's claim, so no
    config is ever run twice; both may give way, which only costs another round.
    """
    for attempt in range(rounds):
        with lock:
            taken = _claimed(trials_of(study), trial.number)
            free = [c for c in candidates if canonical(c) not in taken]
            if not free:
                return None
            pick = dict(free[0] if attempt == 0 else rng.choice(free[: max(1, min(len(free), 4))]))
            trial.set_user_attr("claim", canonical(pick))
            if canonical(pick) not in _claimed(trials_of(study), trial.number):
                return pick
        threading.Event().wait(rng.uniform(0.01, 0.05))
    return None


def make_sampler(name: str, seed: int, trials: int) -> Any:
    import optuna

    if name == "tpe":
        # constant liar: trials asked together (a batch, other GPUs) are steered apart
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, trials // 3)),
                                          constant_liar=True)
    if name in ("random", "grid", "exhaustive", "pattern"):  # grid and pattern pin every config (momtune.search)
        return optuna.samplers.RandomSampler(seed=seed)
    raise InputError(f"--sampler: {name!r} is not accepted; use one of {', '.join(SAMPLERS)} "
                     "(CMA-ES does not handle categorical parameters)")


def pinning_sampler(base: Any) -> Any:
    import optuna

    class PinnedSampler(optuna.samplers.BaseSampler):
        """Delegates to ``base`` except for trials whose config the driver pinned."""

        def __init__(self) -> None:
            self.base, self.pins, self.lock = base, {}, threading.Lock()

        def pin(self, number: int, config: Mapping[str, Any]) -> None:
            with self.lock:
                self.pins[number] = dict(config)

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return self.base.infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, space: Any) -> Any:
            return {} if trial.number in self.pins else self.base.sample_relative(study, trial, space)

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            pin = self.pins.get(trial.number)
            if pin is not None and name in pin:
                return pin[name]
            return self.base.sample_independent(study, trial, name, dist)

        def before_trial(self, study: Any, trial: Any) -> None:
            self.base.before_trial(study, trial)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self.base.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self.base.reseed_rng()

    return PinnedSampler()


class Shield:
    """Defer Ctrl-C / SIGTERM (in the main thread) until a storage update is complete."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "Shield":
        self.pending: int | None = None
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.old = {s: signal.signal(s, self._defer) for s in self.SIGNALS}
        return self

    def _defer(self, signum: int, frame: Any) -> None:
        self.pending = signum

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            for s, h in self.old.items():
                signal.signal(s, h)
            if self.pending is not None:
                handler = self.old[self.pending]
                if callable(handler):
                    handler(self.pending, None)
                elif handler == signal.SIG_DFL:
                    raise KeyboardInterrupt


class InFlight:
    """The trials this process is running: heartbeats for them (a thread), and their release on
    interrupt (FAIL without status = lost, so a rerun redoes them at once instead of waiting out
    the heartbeat grace period)."""

    def __init__(self, storage: Any, heartbeat_s: int) -> None:
        self.storage, self.heartbeat_s = storage, heartbeat_s
        self.ids: set[int] = set()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat thread, waiting for it at most twice its period: it is a daemon, and a
        beat blocked on the storage (a lock an interrupted transaction left behind, a slow server)
        must not keep an interrupted search from exiting (clean-clone CI, session 10: a Ctrl-C'd
        search once did not exit within 60 s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2.0 * self.heartbeat_s))

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.ids.add(trial_id)
        self.storage.record_heartbeat(trial_id)

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.ids.discard(trial_id)

    def release(self) -> None:
        from optuna.trial import TrialState

        with self.lock:
            ids, self.ids = list(self.ids), set()
        for tid in ids:
            try:
                self.storage.set_trial_state_values(tid, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001 - already finished, or the storage is gone: the heartbeat covers it
                pass

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s / 2):
            with self.lock:
                ids = list(self.ids)
            for tid in ids:
                try:
                    self.storage.record_heartbeat(tid)
                except Exception:  # noqa: BLE001 - a missed beat is retried next time
                    pass
