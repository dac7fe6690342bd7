"""Derived tables of a report, as plain data: kernel times, convergence, dispatch quality
(dispatch_view.py), failures, end-to-end numbers and the list of missing inputs (a training run
is shown as its file records it: trainrun.py)."""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from momtune.study import safe_url

from .collect import BenchRow, Inputs, Library, ShapeId, Study, config_key, slug
from .dispatch_view import DispatchRow, best_trial, dispatch_rows, gpu_for

# implementations in display order, with the labels every table and plot uses (kernel tables:
# "momtune" is the tuned config; end to end it is what the bench ran, labelled from its data)
IMPLS = ("momtune", "momtune-default", "fla", "reference")
IMPL_LABELS = {"momtune": "momtune tuned", "momtune-default": "momtune default",
               "fla": "fla", "reference": "PyTorch reference"}
IMPL_SHORT = {"momtune": "tuned", "momtune-default": "default", "fla": "fla", "reference": "ref"}
E2E_KINDS = ("layer_prefill", "layer_decode", "model_prefill", "model_decode", "layer_train", "model_train")
STATUSES = ("ok", "compile_error", "out_of_resources", "out_of_memory", "timeout", "illegal_memory",
            "wrong_answer", "invalid_config", "error", "lost")
NEAR_OPTIMUM = 1.05  # "reached the optimum" = within 5 %


def impl_of(name: str) -> str:
    return {"momtune-tuned": "momtune"}.get(name, name)


def kernel_impl(row: BenchRow) -> str:
    """A kernel bench row's implementation: "momtune" rows of a bench that ran every template's
    default config (provenance momtune_library null) are default-config times, not tuned ones."""
    impl = impl_of(row.impl)
    return "momtune-default" if impl == "momtune" and row.configs == "defaults" else impl


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
    # relative timing spreads of the times above (None: not recorded, e.g. older data)
    tuned_spread: float | None = None
    default_spread: float | None = None
    fla_spread: float | None = None
    ref_spread: float | None = None
    bench_spread: float | None = None
    floor_peak: dict[str, Any] | None = None  # the peaks floor_ms uses, where recorded
    default_kept: dict[str, Any] | None = None  # the winner's record: the default was kept

    @property
    def momtune_spread(self) -> float | None:
        for ms, spread in ((self.bench_ms, self.bench_spread), (self.tuned_ms, self.tuned_spread),
                           (self.default_ms, self.default_spread)):
            if ms is not None:
                return spread
        return None

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
class E2ERow:
    kind: str
    name: str
    shape: dict[str, int]
    dtype: str
    ms: dict[str, float | None]
    rows: dict[str, BenchRow]

    def vs(self, impl: str) -> float | None:
        return ratio(self.ms.get(impl), self.ms.get("momtune"))

    def spread(self, impl: str) -> float | None:
        row = self.rows.get(impl)
        return row.spread if row is not None else None

    @property
    def configs(self) -> str:
        """Which configs momtune's row ran with: "tuned", "defaults" or "not recorded"."""
        row = self.rows.get("momtune")
        return row.configs if row is not None else "not recorded"


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
    labels: dict[str, str] = field(default_factory=lambda: dict(IMPL_LABELS))  # kernel tables and plots
    e2e_labels: dict[str, str] = field(default_factory=lambda: dict(IMPL_LABELS))  # end to end, from the data

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
    for t in inputs.train_runs:  # named in the title, kept out of the kernels' dispatch rule
        gpu = t.provenance.get("gpu")
        if gpu:
            names.setdefault(slug(gpu), str(gpu))
    return names, sole


def _winner(studies: list[Study]) -> tuple[float | None, dict[str, Any] | None, Study | None]:
    wins = [(float(s.winner["time_ms"]), dict(s.winner["config"]), s) for s in studies
            if s.winner and isinstance(s.winner.get("config"), dict)
            and isinstance(s.winner.get("time_ms"), (int, float))]
    return min(wins, key=lambda w: w[0]) if wins else (None, None, None)


def spread_of(studies: list[Study], config: dict[str, Any] | None) -> float | None:
    """The first recorded spread of ``config``'s time in a shape's studies (None: not recorded)."""
    return next((v for v in (s.spread_of(config) for s in studies) if v is not None), None)


# ---------------------------------------------------------------- the analysis


def analyze(inputs: Inputs, dispatcher_factory: Callable[[Library], Any] | None = None) -> Analysis:
    gpus, sole = _gpu_slugs(inputs)
    by_sid: dict[ShapeId, list[Study]] = defaultdict(list)
    for s in inputs.studies:
        by_sid[s.key].append(s)
    labels = {**IMPL_LABELS, "fla": fla_label(inputs)}
    kernels = _kernel_rows(inputs, by_sid, gpus, sole, labels)
    dispatch, method, held_out = dispatch_rows(inputs, by_sid, kernels, sole, dispatcher_factory)
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
        + ([inputs.library.provenance] if inputs.library else [])) or any(
        slug(t.device).startswith(("cpu", "interpreter")) for t in inputs.train_runs)
    analysis = Analysis(inputs, gpus, kernels, _summaries(by_sid), dispatch, method, held_out, dict(failures),
                        {k: c.most_common(1)[0][0] for k, c in reasons.items()}, e2e, [], interp, labels,
                        {**labels, "momtune": momtune_label(e2e)})
    analysis.missing = _missing(analysis)
    return analysis


def fla_label(inputs: Inputs) -> str:
    """"fla <version>" when the bench files with fla rows record one version, else "fla"."""
    versions = {str(b.provenance["fla"]) for b in inputs.benches
                if b.provenance.get("fla") and any(impl_of(r.impl) == "fla" for r in b.rows)}
    return f"fla {versions.pop()}" if len(versions) == 1 else "fla"


def momtune_label(rows: list[E2ERow]) -> str:
    """What momtune's end-to-end rows ran, from the bench files: a tuned library, the default
    configs, or not recorded (never "tuned" without the data saying so)."""
    kinds = {r.configs for r in rows if "momtune" in r.rows}
    if kinds == {"tuned"}:
        return "momtune (tuned library)"
    if kinds == {"defaults"}:
        return "momtune (default configs)"
    if kinds <= {"not recorded"}:
        return "momtune (configs not recorded)"
    return "momtune (" + " / ".join(sorted(kinds)) + ": see the table)"


def _kernel_rows(inputs: Inputs, by_sid: dict[ShapeId, list[Study]], gpus: dict[str, str],
                 sole: str | None, labels: dict[str, str]) -> list[KernelRow]:
    rows: dict[ShapeId, KernelRow] = {}

    def row(sid: ShapeId) -> KernelRow:
        for known in rows:  # same problem with shape keys in another order
            if known.same_problem(sid):
                return rows[known]
        return rows.setdefault(sid, KernelRow(sid, gpus.get(sid.gpu, sid.gpu)))

    for sid, studies in by_sid.items():
        r = row(sid)
        r.tuned_ms, r.tuned_config, won = _winner(studies)
        r.tuned_src = "study winner" if r.tuned_ms is not None else ""
        if won is not None:
            r.tuned_spread, r.default_kept = won.spread_of(r.tuned_config), won.default_kept
        if r.tuned_ms is None:
            r.tuned_ms, r.tuned_config = best_trial(studies)
            r.tuned_src = "best trial" if r.tuned_ms is not None else ""
            r.tuned_spread = spread_of(studies, r.tuned_config)
        defaults = sorted((s.default_time_ms, s.name, s) for s in studies if s.default_time_ms is not None)
        if defaults:
            r.default_ms, r.default_spread = defaults[0][0], defaults[0][2].default_spread
        floors = [s for s in studies if s.floor_ms is not None]
        if floors:
            r.floor_ms, r.floor_peak = floors[0].floor_ms, floors[0].floor_peak
    if inputs.library:
        lgpu = gpu_for(inputs.library.provenance, sole)
        lpeak = inputs.library.provenance.get("floor_peak")
        for e in inputs.library.entries:
            sid = ShapeId.of(e.template, lgpu, e.shape, e.dtype)
            r = row(sid)
            studies = next((ss for k, ss in by_sid.items() if k.same_problem(sid)), [])
            if e.time_ms is not None:
                if r.default_kept and config_key(e.config) != config_key(r.tuned_config or {}):
                    r.default_kept = None  # the library holds another config than the study's kept default
                r.tuned_ms, r.tuned_config, r.tuned_src = e.time_ms, e.config, "library"
                r.tuned_spread = spread_of(studies, e.config)
            if e.default_time_ms is not None:
                r.default_ms = e.default_time_ms
                r.default_spread = next((s.default_spread for s in studies if s.default_spread is not None), None)
            if e.floor_ms is not None and r.floor_ms is None:
                r.floor_ms, r.floor_peak = e.floor_ms, lpeak if isinstance(lpeak, dict) else None
    for b in inputs.benches:
        bgpu = gpu_for(b.provenance, sole)
        bpeak = b.provenance.get("floor_peak")
        for br in b.rows:
            if br.kind != "kernel":
                continue
            r = row(ShapeId.of(br.name, bgpu, br.shape, br.dtype))
            impl = kernel_impl(br)
            if br.floor_ms is not None and r.floor_ms is None:
                r.floor_ms, r.floor_peak = br.floor_ms, bpeak if isinstance(bpeak, dict) else None
            label = labels.get(impl, impl)
            if br.ms is None:
                r.why[impl] = f"{label}: {br.note or 'the bench row has no time'} ({br.source})"
                continue
            if br.note:
                r.notes.append(f"{label}: {br.note}")
            if impl == "fla":
                r.fla_ms, r.fla_spread = br.ms, br.spread
            elif impl == "reference":
                r.ref_ms, r.ref_spread = br.ms, br.spread
            elif impl == "momtune":
                r.bench_ms, r.bench_spread = br.ms, br.spread
                if r.tuned_ms is None:
                    r.tuned_ms, r.tuned_spread = br.ms, br.spread
                    r.tuned_src = "bench" if br.configs == "tuned" else "bench (which configs it ran: not recorded)"
            elif impl == "momtune-default" and r.default_ms is None:
                r.default_ms, r.default_spread = br.ms, br.spread
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
                s, len(s.ok_trials), sum(t.state == "FAIL" and t.status != "not_run" for t in s.trials),
                sum(t.state == "PRUNED" for t in s.trials), s.best_ms, target, bool(optimum), reached))
    return out


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
    if not inp.train_runs:
        from .trainrun import HOW

        out.append(Missing("training run", "no loss curves of a real training run on momtune's kernels against "
                           "the reference", f"{HOW}, then pass `--train-run train-run.json`"))
    return out
