"""Derived tables of a report, as plain data: kernel times, convergence, dispatch quality,
failures, end-to-end numbers and the list of missing inputs."""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from momtune.study import safe_url

from .collect import (BenchRow, Inputs, Library, ShapeId, Study, config_key, nearest, slug)

# implementations in display order, with the labels every table and plot uses
IMPLS = ("momtune", "momtune-default", "fla", "reference")
IMPL_LABELS = {"momtune": "momtune tuned", "momtune-default": "momtune default",
               "fla": "fla 0.6.0", "reference": "PyTorch reference"}
IMPL_SHORT = {"momtune": "tuned", "momtune-default": "default", "fla": "fla", "reference": "ref"}
E2E_KINDS = ("layer_prefill", "layer_decode", "model_prefill", "model_decode")
STATUSES = ("ok", "compile_error", "out_of_resources", "timeout", "illegal_memory", "wrong_answer",
            "invalid_config", "error", "lost")
NEAR_OPTIMUM = 1.05  # "reached the optimum" = within 5 %


def impl_of(name: str) -> str:
    return {"momtune-tuned": "momtune"}.get(name, name)


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den is not None and den > 0 else None


@dataclass
class KernelRow:
    sid: ShapeId
    gpu: str
    tuned_ms: float | None = None
    tuned_src: str = ""
    tuned_config: dict[str, Any] | None = None
    default_ms: float | None = None
    fla_ms: float | None = None
    ref_ms: float | None = None
    bench_ms: float | None = None  # momtune tuned, timed by the bench next to fla / reference
    floor_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # impl -> why its bench row has no time

    @property
    def speedup(self) -> float | None:
        return ratio(self.default_ms, self.tuned_ms)

    @property
    def momtune_ms(self) -> float | None:
        """momtune's best known time: the bench's (same harness as fla), else tuned, else default."""
        for ms in (self.bench_ms, self.tuned_ms, self.default_ms):
            if ms is not None:
                return ms
        return None

    @property
    def vs_fla(self) -> float | None:
        """fla / momtune, both from the bench when it timed momtune too (same harness)."""
        return ratio(self.fla_ms, self.momtune_ms)

    @property
    def vs_ref(self) -> float | None:
        return ratio(self.ref_ms, self.momtune_ms)

    @property
    def floor_frac(self) -> float | None:
        return ratio(self.floor_ms, self.tuned_ms if self.tuned_ms is not None else self.default_ms)


@dataclass
class StudySummary:
    study: Study
    complete: int
    failed: int
    pruned: int
    best_ms: float | None
    target_ms: float | None  # exhaustive optimum if known, else best over the shape's studies
    target_is_optimum: bool
    trials_to_target: int | None  # 1-based trial count to reach within NEAR_OPTIMUM of target


@dataclass
class DispatchRow:
    sid: ShapeId
    config: dict[str, Any]
    source: str  # exact / nearest / default / nearest (held out)
    picked_ms: float | None
    best_ms: float | None
    neighbour: ShapeId | None = None

    @property
    def regret(self) -> float | None:
        return ratio(self.picked_ms, self.best_ms)


@dataclass
class E2ERow:
    kind: str
    name: str
    shape: dict[str, int]
    dtype: str
    ms: dict[str, float | None]
    rows: dict[str, BenchRow]

    def vs(self, impl: str) -> float | None:
        return ratio(self.ms.get(impl), self.ms.get("momtune"))


@dataclass
class Missing:
    what: str
    effect: str
    how: str


@dataclass
class Analysis:
    inputs: Inputs
    gpus: dict[str, str]  # slug -> display name
    kernels: list[KernelRow]
    summaries: list[StudySummary]
    dispatch: list[DispatchRow]
    dispatch_method: str
    held_out: list[DispatchRow]
    failures: dict[str, Counter[str]]
    top_reasons: dict[tuple[str, str], str]
    e2e: list[E2ERow]
    missing: list[Missing]
    interpreter: bool

    def by_sid(self) -> dict[ShapeId, list[Study]]:
        out: dict[ShapeId, list[Study]] = defaultdict(list)
        for s in self.inputs.studies:
            out[s.key].append(s)
        return out


# ---------------------------------------------------------------- helpers


def _gpu_slugs(inputs: Inputs) -> tuple[dict[str, str], str | None]:
    names: dict[str, str] = {}
    for s in inputs.studies:
        names.setdefault(slug(s.gpu), s.gpu)
    provs = [b.provenance for b in inputs.benches] + ([inputs.library.provenance] if inputs.library else [])
    for p in provs:
        if p.get("gpu"):
            names.setdefault(slug(p["gpu"]), str(p["gpu"]))
    sole = next(iter(names)) if len(names) == 1 else None
    return names, sole


def _gpu_for(prov: dict[str, Any], sole: str | None) -> str:
    return slug(prov["gpu"]) if prov.get("gpu") else (sole or "unknown")


def measured(studies: list[Study], config: dict[str, Any] | None) -> float | None:
    """Best measured time of one config across a shape's studies (the default time as a last resort)."""
    if config is None:
        return None
    key = config_key(config)
    times = [t.time_ms for s in studies for t in s.ok_trials if t.time_ms is not None and config_key(t.config) == key]
    if times:
        return min(times)
    defaults = [s.default_time_ms for s in studies if s.default_config and config_key(s.default_config) == key
                and s.default_time_ms is not None]
    return min(defaults) if defaults else None


def _best(studies: list[Study]) -> tuple[float | None, dict[str, Any] | None]:
    best: tuple[float | None, dict[str, Any] | None] = (None, None)
    for s in studies:
        for t in s.ok_trials:
            if t.time_ms is not None and (best[0] is None or t.time_ms < best[0]):
                best = (t.time_ms, t.config)
    return best


def _winner(studies: list[Study]) -> tuple[float | None, dict[str, Any] | None]:
    wins = [(float(w["time_ms"]), dict(w["config"])) for w in (s.winner for s in studies)
            if w and isinstance(w.get("config"), dict) and isinstance(w.get("time_ms"), (int, float))]
    return min(wins, key=lambda w: w[0]) if wins else (None, None)


# ---------------------------------------------------------------- the analysis


def analyze(inputs: Inputs, dispatcher_factory: Callable[[Library], Any] | None = None) -> Analysis:
    gpus, sole = _gpu_slugs(inputs)
    by_sid: dict[ShapeId, list[Study]] = defaultdict(list)
    for s in inputs.studies:
        by_sid[s.key].append(s)
    kernels = _kernel_rows(inputs, by_sid, gpus, sole)
    dispatch, method, held_out = _dispatch(inputs, by_sid, kernels, sole, dispatcher_factory)
    failures: dict[str, Counter[str]] = defaultdict(Counter)
    reasons: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for s in inputs.studies:
        for t in s.trials:
            failures[s.template][t.status] += 1
            if t.status != "ok" and t.reason:
                reasons[(s.template, t.status)][t.reason[:120]] += 1
    e2e = _e2e(inputs)
    interp = any(s.interpreter or slug(s.gpu) in ("interpreter", "cpu") for s in inputs.studies) or any(
        bool(p.get("interpreter")) for p in [b.provenance for b in inputs.benches]
        + ([inputs.library.provenance] if inputs.library else []))
    analysis = Analysis(inputs, gpus, kernels, _summaries(by_sid), dispatch, method, held_out, dict(failures),
                        {k: c.most_common(1)[0][0] for k, c in reasons.items()}, e2e, [], interp)
    analysis.missing = _missing(analysis)
    return analysis


def _kernel_rows(inputs: Inputs, by_sid: dict[ShapeId, list[Study]], gpus: dict[str, str],
                 sole: str | None) -> list[KernelRow]:
    rows: dict[ShapeId, KernelRow] = {}

    def row(sid: ShapeId) -> KernelRow:
        for known in rows:  # same problem with shape keys in another order
            if known.same_problem(sid):
                return rows[known]
        return rows.setdefault(sid, KernelRow(sid, gpus.get(sid.gpu, sid.gpu)))

    for sid, studies in by_sid.items():
        r = row(sid)
        r.tuned_ms, r.tuned_config = _winner(studies)
        r.tuned_src = "study winner" if r.tuned_ms is not None else ""
        if r.tuned_ms is None:
            r.tuned_ms, r.tuned_config = _best(studies)
            r.tuned_src = "best trial" if r.tuned_ms is not None else ""
        defaults = [s.default_time_ms for s in studies if s.default_time_ms is not None]
        r.default_ms = min(defaults) if defaults else None
        floors = [s.floor_ms for s in studies if s.floor_ms is not None]
        r.floor_ms = floors[0] if floors else None
    if inputs.library:
        lgpu = _gpu_for(inputs.library.provenance, sole)
        for e in inputs.library.entries:
            r = row(ShapeId.of(e.template, lgpu, e.shape, e.dtype))
            if e.time_ms is not None:
                r.tuned_ms, r.tuned_config, r.tuned_src = e.time_ms, e.config, "library"
            if e.default_time_ms is not None:
                r.default_ms = e.default_time_ms
    for b in inputs.benches:
        bgpu = _gpu_for(b.provenance, sole)
        for br in b.rows:
            if br.kind != "kernel":
                continue
            r = row(ShapeId.of(br.name, bgpu, br.shape, br.dtype))
            impl = impl_of(br.impl)
            if br.floor_ms is not None and r.floor_ms is None:
                r.floor_ms = br.floor_ms
            label = IMPL_LABELS.get(impl, impl)
            if br.ms is None:
                r.why[impl] = f"{label}: {br.note or 'the bench row has no time'} ({br.source})"
                continue
            if br.note:
                r.notes.append(f"{label}: {br.note}")
            if impl == "fla":
                r.fla_ms = br.ms
            elif impl == "reference":
                r.ref_ms = br.ms
            elif impl == "momtune":
                r.bench_ms = br.ms
                if r.tuned_ms is None:
                    r.tuned_ms, r.tuned_src = br.ms, "bench"
            elif impl == "momtune-default" and r.default_ms is None:
                r.default_ms = br.ms
    return sorted(rows.values(), key=lambda r: (r.sid.template, r.sid.gpu, r.sid.dtype, r.sid.shape))


def _summaries(by_sid: dict[ShapeId, list[Study]]) -> list[StudySummary]:
    out: list[StudySummary] = []
    for sid in sorted(by_sid, key=lambda k: (k.template, k.gpu, k.dtype, k.shape)):
        studies = by_sid[sid]
        optimum = [s.best_ms for s in studies if s.exhaustive and s.best_ms is not None]
        overall = [s.best_ms for s in studies if s.best_ms is not None]
        target = min(optimum) if optimum else (min(overall) if overall else None)
        for s in sorted(studies, key=lambda s: (s.exhaustive, s.sampler, s.name)):
            reached = None
            if target is not None:
                for i, t in enumerate(sorted(s.trials, key=lambda t: t.number)):
                    if t.state == "COMPLETE" and t.time_ms is not None and t.time_ms <= target * NEAR_OPTIMUM:
                        reached = i + 1
                        break
            out.append(StudySummary(
                s, len(s.ok_trials), sum(t.state == "FAIL" for t in s.trials),
                sum(t.state == "PRUNED" for t in s.trials), s.best_ms, target, bool(optimum), reached))
    return out


def _dispatch(inputs: Inputs, by_sid: dict[ShapeId, list[Study]], kernels: list[KernelRow],
              sole: str | None, factory: Callable[[Library], Any] | None
              ) -> tuple[list[DispatchRow], str, list[DispatchRow]]:
    lib = inputs.library
    rows: list[DispatchRow] = []
    method = ""
    if lib is not None:
        pick, method, errors = _picker(lib, factory)
        lgpu = _gpu_for(lib.provenance, sole)
        for sid, studies in sorted(by_sid.items(), key=lambda kv: (kv[0].template, kv[0].shape)):
            if sid.gpu != lgpu:
                continue
            config, source = pick(sid.template, sid.shape_dict, sid.dtype)
            if not config:  # a template the library does not hold: its default config
                config = next((s.default_config for s in studies if s.default_config), {})
            rows.append(DispatchRow(sid, config, source, measured(studies, config), _best(studies)[0]))
        if errors:
            method += f"; the local rule stood in where it failed ({errors[0]})"
    # held out: each tuned shape gets the config of the nearest other tuned shape
    tuned = [(k.sid, k.tuned_config) for k in kernels if k.tuned_config is not None]
    held: list[DispatchRow] = []
    for sid, _ in tuned:
        if sid not in by_sid:
            continue
        others = [(o.shape_dict, (o, cfg)) for o, cfg in tuned
                  if o != sid and (o.template, o.gpu, o.dtype) == (sid.template, sid.gpu, sid.dtype)]
        hit = nearest(others, sid.shape_dict)
        if hit is None:
            held.append(DispatchRow(sid, {}, "no neighbour", None, _best(by_sid[sid])[0]))
            continue
        (other, cfg), _ = hit
        held.append(DispatchRow(sid, cfg, "nearest (held out)", measured(by_sid[sid], cfg),
                                _best(by_sid[sid])[0], other))
    return rows, method, held


Picker = Callable[[str, dict[str, int], str], tuple[dict[str, Any], str]]


def _picker(lib: Library, factory: Callable[[Library], Any] | None) -> tuple[Picker, str, list[str]]:
    """Dispatch through momtune.dispatch.Dispatcher when it exists, else the local nearest rule."""
    def local(template: str, shape: dict[str, int], dtype: str) -> tuple[dict[str, Any], str]:
        cands = [(e.shape, e) for e in lib.entries if e.template == template and e.dtype == dtype]
        for s, e in cands:
            if s == shape:
                return e.config, "exact"
        hit = nearest(cands, shape)
        if hit is not None:
            return hit[0].config, "nearest"
        return lib.default_configs.get(template, {}), "default"

    errors: list[str] = []
    try:
        if factory is None:
            from momtune.dispatch import Dispatcher

            def factory(library: Library) -> Any:  # noqa: F811 - the real dispatcher
                try:  # judged as on the library's own machine: no probing of this one
                    return Dispatcher(str(library.path), "ignore", machine=library.provenance)
                except TypeError:
                    return Dispatcher(str(library.path), "ignore")
        dispatcher = factory(lib)
    except ImportError:
        return local, "nearest-bucket rule (local copy: momtune.dispatch is not available)", errors
    except Exception as exc:  # noqa: BLE001 - report what went wrong, keep reporting
        return local, f"nearest-bucket rule (local copy: Dispatcher failed: {type(exc).__name__}: {exc})", errors

    def real(template: str, shape: dict[str, int], dtype: str) -> tuple[dict[str, Any], str]:
        try:
            config, source = dispatcher.config(template, shape, dtype)
            return dict(config), str(source)
        except Exception as exc:  # noqa: BLE001 - e.g. a template this checkout does not know
            errors.append(f"{template}: {type(exc).__name__}: {exc}")
            config, source = local(template, shape, dtype)
            return config, f"{source} (local rule)"

    return real, "momtune.dispatch.Dispatcher", errors


def _e2e(inputs: Inputs) -> list[E2ERow]:
    groups: dict[tuple[str, str, tuple[tuple[str, int], ...], str], dict[str, BenchRow]] = {}
    for b in inputs.benches:
        for r in b.rows:
            if r.kind in E2E_KINDS:
                groups.setdefault((r.kind, r.name, tuple(r.shape.items()), r.dtype), {})[impl_of(r.impl)] = r
    out = [E2ERow(k, n, dict(s), d, {i: rows[i].ms for i in rows}, rows) for (k, n, s, d), rows in groups.items()]
    return sorted(out, key=lambda r: (E2E_KINDS.index(r.kind), r.name, tuple(r.shape.items())))


def _missing(a: Analysis) -> list[Missing]:
    inp = a.inputs
    out: list[Missing] = []
    store = inp.storage or "URL"
    if not inp.studies:
        out.append(Missing("Optuna studies", "no search convergence, parameter importance, failure counts or "
                           "dispatch quality", f"`momtune search --storage {safe_url(store)}` on the GPU, then pass "
                           f"`--storage {safe_url(store)}`"))
    if inp.library is None:
        out.append(Missing("tuned library", "tuned times come from the studies' winners; no dispatch view",
                           f"`momtune export --storage {safe_url(store)} --out library/<gpu>.json`, then pass `--library`"))
    rows = [r for b in inp.benches for r in b.rows]
    if not inp.benches:
        out.append(Missing("bench file", "no fla or reference times, no end-to-end numbers",
                           "`momtune bench --out bench.json` on the GPU, then pass `--bench bench.json`"))
    else:
        kern = [r for r in rows if r.kind == "kernel"]
        if not any(impl_of(r.impl) == "fla" and r.ms is not None for r in kern):
            out.append(Missing("fla kernel rows", "the fla column is empty",
                               "`momtune bench` with flash-linear-attention 0.6.0 installed"))
        if not any(impl_of(r.impl) == "reference" and r.ms is not None for r in kern):
            out.append(Missing("reference kernel rows", "the reference column is empty",
                               "`momtune bench` (kernel cases time the PyTorch reference too)"))
        if not any(r.kind in E2E_KINDS for r in rows):
            out.append(Missing("layer/model rows", "no end-to-end numbers",
                               "`momtune bench` with its layer and model cases"))
    return out
