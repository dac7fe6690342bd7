"""Read Optuna studies, a tuned library and bench files into plain data (docs/DATA_FORMATS.md).

Nothing here runs a kernel or needs a GPU: a report is rebuilt from stored results alone.
Every problem with an input the user named raises :class:`ReportError` naming that input.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from momtune.errors import ReportError
from momtune.study import safe_url

if TYPE_CHECKING:
    from .trainrun import TrainRun

BENCH_SCHEMA = "momtune.bench/1"
BENCH_KINDS = ("kernel", "layer_prefill", "layer_decode", "model_prefill", "model_decode", "layer_train", "model_train",
               "recurrence")
# Shape keys that count problem size (tokens, segments, batch); the others must match exactly
# for one shape's config to stand in for another's (the nearest-bucket dispatch rule). The set of
# momtune.dispatch is used when that module exists (see size_keys()).
SIZE_KEYS = frozenset({"N", "B", "T", "S", "Np", "L", "M_rows", "tokens", "batch", "seqlen"})
MIN_IMPORTANCE_TRIALS = 8


@dataclass
class Trial:
    number: int
    state: str  # optuna TrialState name: COMPLETE, FAIL, PRUNED, RUNNING, WAITING
    status: str  # trial attr `status` ("ok", "compile_error", ...)
    config: dict[str, Any]
    time_ms: float | None  # measured time (ok trials only)
    reason: str = ""
    spread: float | None = None  # relative timing spread (trial attr `spread`; None in older studies)


@dataclass
class Importance:
    values: dict[str, float]  # parameter -> importance (sums to ~1), empty when not computed
    method: str
    note: str = ""  # why it was not computed


@dataclass
class Study:
    name: str
    template: str
    shape: dict[str, int]
    dtype: str
    gpu: str
    interpreter: bool
    sampler: str
    space_size: int | None
    provenance: dict[str, Any]
    default_config: dict[str, Any]
    default_time_ms: float | None
    floor_ms: float | None
    winner: dict[str, Any] | None
    trials: list[Trial]
    importance: Importance = field(default_factory=lambda: Importance({}, "", "not computed"))
    floor_peak: dict[str, Any] | None = None  # the peaks floor_ms uses (study attr; None in older studies)
    timing_mode: str = ""

    def spread_of(self, config: Mapping[str, Any] | None) -> float | None:
        """The recorded spread of ``config``'s time: the winner's re-timing (it or a candidate),
        else its fastest trial's; None where nothing recorded one."""
        if not config:
            return None
        key = config_key(config)
        w = self.winner or {}
        if isinstance(w.get("config"), dict) and config_key(w["config"]) == key and num_or_none(w.get("spread")) is not None:
            return num_or_none(w.get("spread"))
        for c in w.get("candidates") or []:
            if isinstance(c, dict) and isinstance(c.get("config"), dict) and config_key(c["config"]) == key:
                if num_or_none(c.get("spread")) is not None:
                    return num_or_none(c.get("spread"))
        trials = [t for t in self.ok_trials if config_key(t.config) == key]
        best = min(trials, key=lambda t: t.time_ms or math.inf, default=None)
        return best.spread if best else None

    @property
    def default_spread(self) -> float | None:
        """The spread of default_time_ms: the default as a candidate of the winner's re-timing."""
        w = self.winner or {}
        key = config_key(self.default_config) if self.default_config else None
        for c in w.get("candidates") or []:
            if isinstance(c, dict) and isinstance(c.get("config"), dict) and config_key(c["config"]) == key:
                return num_or_none(c.get("spread"))
        if w.get("default_kept") and isinstance(w.get("config"), dict) and config_key(w["config"]) == key:
            return num_or_none(w.get("spread"))
        return None

    @property
    def default_kept(self) -> dict[str, Any] | None:
        """The winner record's ``default_kept``: the config that came within noise of the default."""
        kept = (self.winner or {}).get("default_kept")
        return kept if isinstance(kept, dict) else None

    @property
    def key(self) -> "ShapeId":
        return ShapeId.of(self.template, self.gpu, self.shape, self.dtype)

    @property
    def ok_trials(self) -> list[Trial]:
        return [t for t in self.trials if t.state == "COMPLETE" and t.time_ms is not None and math.isfinite(t.time_ms)]

    @property
    def best_ms(self) -> float | None:
        times = [t.time_ms for t in self.ok_trials if t.time_ms is not None]
        return min(times) if times else None

    @property
    def label(self) -> str:
        """The sampler, plus the study-name prefix when that says something else (e.g. "tpe (run2)")."""
        prefix = self.name.rpartition("/")[0]
        return self.sampler if prefix in ("", self.sampler) else f"{self.sampler} ({prefix})"

    @property
    def exhaustive(self) -> bool:
        """Every valid config was tried: only then is its best the optimum. A study meant to be
        exhaustive but cut short (e.g. by a time limit) is an ordinary grid study here."""
        meant = self.sampler in ("exhaustive", "grid") or self.name.rpartition("/")[0] == "exhaustive"
        if not meant:
            return False
        if not self.space_size:
            return self.sampler == "exhaustive" or self.name.rpartition("/")[0] == "exhaustive"
        done = sum(t.state in ("COMPLETE", "FAIL", "PRUNED") for t in self.trials)
        return done >= self.space_size


@dataclass(frozen=True)
class ShapeId:
    """One tuning problem: template, GPU, shape and dtype (hashable, comparable across inputs)."""

    template: str
    gpu: str  # slug
    shape: tuple[tuple[str, int], ...]  # in the template's key order
    dtype: str

    @staticmethod
    def of(template: str, gpu: str, shape: Mapping[str, int], dtype: str) -> "ShapeId":
        return ShapeId(template, slug(gpu), tuple((k, int(v)) for k, v in shape.items()), norm_dtype(dtype))

    @property
    def shape_dict(self) -> dict[str, int]:
        return dict(self.shape)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape)

    def same_problem(self, other: "ShapeId") -> bool:
        return (self.template, self.gpu, self.dtype, sorted(self.shape)) == (
            other.template, other.gpu, other.dtype, sorted(other.shape))


@dataclass
class LibraryEntry:
    template: str
    shape: dict[str, int]
    dtype: str
    config: dict[str, Any]
    time_ms: float | None
    default_time_ms: float | None
    trials: int | None
    study: str
    floor_ms: float | None = None


@dataclass
class Library:
    path: Path
    provenance: dict[str, Any]
    default_configs: dict[str, dict[str, Any]]
    entries: list[LibraryEntry]


@dataclass
class BenchRow:
    kind: str
    name: str
    shape: dict[str, int]
    dtype: str
    impl: str
    ms: float | None
    tokens_per_s: float | None = None
    peak_mem_mb: float | None = None
    floor_ms: float | None = None
    max_rel_err: float | None = None
    note: str = ""
    source: str = ""
    graph_ms: float | None = None  # momtune's decode step replayed in a CUDA graph (momtune bench)
    ms_min: float | None = None
    ms_max: float | None = None
    configs: str = "not recorded"  # momtune rows: "tuned", "defaults" or "not recorded" (see bench_configs)

    @property
    def spread(self) -> float | None:
        """Relative min-max spread of the timed calls, (max - min) / median; None if not recorded."""
        if self.ms is None or self.ms_min is None or self.ms_max is None or self.ms <= 0:
            return None
        return max(0.0, (self.ms_max - self.ms_min) / self.ms)


@dataclass
class Bench:
    path: Path
    provenance: dict[str, Any]
    rows: list[BenchRow]

    @property
    def configs(self) -> str:
        """Which configs momtune ran with, from provenance ``momtune_library``: "tuned" (a library
        path), "defaults" (null: every template's default) or "not recorded" (an older file)."""
        return bench_configs(self.provenance)


def bench_configs(provenance: Mapping[str, Any]) -> str:
    lib = provenance.get("momtune_library", "auto")
    if isinstance(lib, str) and lib.strip().lower() == "auto":  # older files: the setting, not what ran
        return "not recorded"
    return "defaults" if lib is None or str(lib).strip().lower() in ("", "none") else "tuned"


@dataclass
class Inputs:
    storage: str | None
    studies: list[Study]
    library: Library | None
    benches: list[Bench]
    repo_commit: str | None
    warnings: list[str] = field(default_factory=list)
    train_runs: list[TrainRun] = field(default_factory=list)  # bench/gpu_train_run.py --out (trainrun.py)


# ---------------------------------------------------------------- small helpers


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def norm_dtype(dtype: str) -> str:
    return str(dtype).removeprefix("torch.")


def config_key(config: Mapping[str, Any]) -> str:
    """A canonical string of a config, to compare configs read from different inputs."""
    return json.dumps({k: config[k] for k in sorted(config)}, sort_keys=True, default=str)


def num_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def repo_commit() -> str | None:
    """The git commit of the momtune checkout this code runs from, if it is one."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return out.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


# ---------------------------------------------------------------- library and bench JSON


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ReportError(f"{what} {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{what} {path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _shape(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        raise ReportError(f"{where}: `shape` must be an object of integers, got {value!r}")
    return {str(k): int(v) for k, v in value.items()}


def load_library(path: str | Path) -> Library:
    """A tuned library (read and checked by :func:`momtune.library.load_library`) as report rows."""
    from momtune.errors import LibraryError
    from momtune.library import load_library as read_library

    p = Path(path)
    try:
        lib = read_library(p)
    except LibraryError as exc:
        raise ReportError(str(exc)) from None
    entries: list[LibraryEntry] = []
    defaults: dict[str, dict[str, Any]] = {}
    for name, tpl in lib.templates.items():
        defaults[name] = dict(tpl.get("default_config") or {})
        entries += [LibraryEntry(
            template=name, shape=dict(e["shape"]), dtype=norm_dtype(e["dtype"]), config=dict(e["config"]),
            time_ms=num_or_none(e.get("time_ms")), default_time_ms=num_or_none(e.get("default_time_ms")),
            trials=int(e["trials"]) if num_or_none(e.get("trials")) is not None else None,
            study=str(e.get("study") or ""), floor_ms=num_or_none(e.get("floor_ms"))) for e in tpl["entries"]]
    return Library(p, dict(lib.provenance), defaults, entries)


def load_bench(path: str | Path) -> Bench:
    p = Path(path)
    data = _read_json(p, "bench file")
    if data.get("schema") != BENCH_SCHEMA:
        raise ReportError(f"bench file {p}: schema is {data.get('schema')!r}, expected {BENCH_SCHEMA!r}")
    rows_in = data.get("rows")
    if not isinstance(rows_in, list):
        raise ReportError(f"bench file {p}: `rows` must be a list")
    prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    configs = bench_configs(prov)
    rows: list[BenchRow] = []
    for i, r in enumerate(rows_in):
        where = f"bench file {p}: rows[{i}]"
        if not isinstance(r, dict):
            raise ReportError(f"{where}: expected an object")
        missing = [k for k in ("kind", "name", "impl") if not r.get(k)]
        if missing:
            raise ReportError(f"{where}: missing {', '.join(missing)}")
        if r["kind"] not in BENCH_KINDS:
            raise ReportError(f"{where}: kind {r['kind']!r} is not one of {', '.join(BENCH_KINDS)}")
        rows.append(BenchRow(
            kind=str(r["kind"]), name=str(r["name"]), shape=_shape(r.get("shape", {}), where),
            dtype=norm_dtype(r.get("dtype") or ""), impl=str(r["impl"]), ms=num_or_none(r.get("ms")),
            tokens_per_s=num_or_none(r.get("tokens_per_s")), peak_mem_mb=num_or_none(r.get("peak_mem_mb")),
            floor_ms=num_or_none(r.get("floor_ms")), max_rel_err=num_or_none(r.get("max_rel_err")),
            note=str(r.get("note") or ""), source=p.name, graph_ms=num_or_none(r.get("graph_ms")),
            ms_min=num_or_none(r.get("ms_min")), ms_max=num_or_none(r.get("ms_max")),
            configs=_row_configs(str(r["impl"]), configs)))
    return Bench(p, dict(prov), rows)


def _row_configs(impl: str, file_configs: str) -> str:
    """A momtune row's configs: its impl says so ("momtune-tuned", "momtune-default"), else the file's."""
    return {"momtune-tuned": "tuned", "momtune-default": "defaults"}.get(impl, file_configs)


def collect(storage: str | None, library: str | Path | None = None,
            benches: Sequence[str | Path] = (), storage_required: bool = True,
            train_runs: Sequence[TrainRun] = (), gpu: str | None = None) -> Inputs:
    """Read every input (``train_runs`` come read: trainrun.load_train_run); only the studies of
    ``gpu`` when given (a ReportError naming the GPUs the storage holds if it has none of it); raise
    ReportError when there is nothing at all to report on."""
    bench_data = [load_bench(b) for b in benches]  # bad arguments fail before the slow part
    lib = load_library(library) if library else None
    studies: list[Study] = []
    warnings: list[str] = []
    if storage:
        from .studies import load_studies

        try:
            studies, warnings = load_studies(storage)
        except ReportError:
            if storage_required:
                raise
            warnings.append(f"storage {safe_url(storage)} could not be read; no studies")
        if gpu is not None and studies:
            from momtune.provenance import gpu_slug

            want = gpu_slug(gpu)
            held = sorted({s.gpu for s in studies})
            kept = [s for s in studies if gpu_slug(s.gpu) == want]
            if not kept:
                raise ReportError(f"--gpu {gpu!r}: the storage {safe_url(storage)} holds no study of that GPU; "
                                  f"it holds studies of {', '.join(held)}")
            if len(kept) < len(studies):
                others = sorted({s.gpu for s in studies if gpu_slug(s.gpu) != want})
                warnings.append(f"--gpu {gpu}: {len(studies) - len(kept)} studies of {', '.join(others)} left out")
            studies = kept
    if not studies and not any(b.rows for b in bench_data) and not (lib and lib.entries) and not train_runs:
        where = f"the storage {safe_url(storage)} holds no momtune studies" if storage else "no --storage was given"
        raise ReportError(f"nothing to report: {where}, and no bench rows, library entries or training runs were "
                          "given; run `momtune search` first, or pass --bench FILE.json from `momtune bench`")
    return Inputs(storage, studies, lib, bench_data, repo_commit(), warnings, list(train_runs))


# ---------------------------------------------------------------- nearest-bucket dispatch rule


def size_keys() -> frozenset[str]:
    """The size keys of the dispatch rule: momtune.dispatch's when it exists, else SIZE_KEYS."""
    try:
        from momtune.dispatch import SIZE_KEYS as keys
    except ImportError:
        return SIZE_KEYS
    return frozenset(keys)


def log_distance(a: Mapping[str, int], b: Mapping[str, int], size: frozenset[str] | None = None) -> float:
    """Distance between two shapes over their size keys (log scale); inf if another key differs."""
    size = size_keys() if size is None else size
    if set(a) != set(b) or any(a[k] != b[k] for k in a if k not in size):
        return math.inf
    return math.sqrt(sum(math.log(max(a[k], 1) / max(b[k], 1)) ** 2 for k in a if k in size))


def nearest(candidates: Sequence[tuple[Mapping[str, int], Any]], shape: Mapping[str, int]) -> tuple[Any, float] | None:
    """The payload of the candidate shape nearest to ``shape`` (ties: first listed), or None."""
    best: tuple[Any, float] | None = None
    size = size_keys()
    for cand_shape, payload in candidates:
        d = log_distance(cand_shape, shape, size)
        if math.isfinite(d) and (best is None or d < best[1]):
            best = (payload, d)
    return best
