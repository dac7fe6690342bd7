"""The report's sections as document blocks (see render.py); figures are written on the way."""
from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from . import plots
from .analyze import IMPL_SHORT, IMPLS, Analysis, E2ERow, KernelRow
from .collect import slug
from .doc import Doc
from .fmt import (DASH, UNRECORDED_SPREAD, ShapeLabels, config_text, gain_cell, geomean, geomean_cell,
                  pct_cell, si, spread_note, spread_text, time_cell, time_text, verdict)
from .peaks import Roofline, any_nominal, peaks_summary, rooflines, valid_peak
from .render import Banner, Bullets, Cards, Cell, Heading, Para, Table, Toc

INTERPRETER_BANNER = "interpreter timings — not GPU performance"
NOTE_TUNED = ("tuned time: a library from `momtune export` (--library) or a finished study from "
              "`momtune search` (--storage)")
NOTE_DEFAULT = "default time: recorded by `momtune search` (study attr default_time_ms) or `momtune export`"
NOTE_FLA = ("fla time: kernel rows for impl fla in a bench file (`momtune bench --out FILE` with "
            "flash-linear-attention 0.6.0 installed; pass --bench FILE)")
NOTE_REF = ("reference time: kernel rows for impl reference in a bench file (`momtune bench --out FILE`; "
            "pass --bench FILE)")
NOTE_FLOOR = "floor: study attr floor_ms (`momtune search`) or floor_ms of a bench row (`momtune bench`)"
CONFIGS_SHORT = {"tuned": "tuned library", "defaults": "default configs", "not recorded": "not recorded"}


def _where(a: Analysis) -> str:
    gpus = sorted(a.gpus.values()) or ["unknown GPU"]
    dtypes = sorted({k.sid.dtype for k in a.kernels if k.sid.dtype} | {s.dtype for s in a.inputs.studies})
    return ", ".join(gpus) + (" · " + ", ".join(dtypes) if dtypes else "")


def default_title(a: Analysis) -> str:
    return f"momtune report — {_where(a)}"


def build(a: Analysis, outdir: Path, built: str, version: str) -> tuple[str, Doc]:
    """All sections; returns (subtitle, doc)."""
    doc = Doc(outdir, ShapeLabels([k.sid for k in a.kernels] + [s.key for s in a.inputs.studies]))
    inp = a.inputs
    n_trials = sum(len(s.trials) for s in inp.studies)
    sources = [f"{len(inp.studies)} stud{'y' if len(inp.studies) == 1 else 'ies'} ({n_trials} trials)"]
    if inp.library:
        sources.append(f"library `{inp.library.path.name}`")
    sources += [f"bench `{b.path.name}`" for b in inp.benches]
    sources += [f"training run `{t.path.name}`" for t in inp.train_runs]
    subtitle = f"Built {built} from " + ", ".join(sources) + "."
    if a.interpreter:
        doc.add(Banner(INTERPRETER_BANNER + ": some studies or benches ran in the Triton interpreter "
                       "(TRITON_INTERPRET=1) on the CPU; their times say nothing about a GPU."))
    floor_peaks = [k.floor_peak for k in a.kernels if k.floor_ms is not None]
    if any_nominal(floor_peaks):
        doc.add(Banner("Some floors use nominal peaks, not ones measured where the kernels ran: "
                       + peaks_summary(floor_peaks) + "."))
    tuned = [k for k in a.kernels if k.tuned_ms is not None]
    pairs_def = [(k.tuned_ms, k.default_ms, k.tuned_spread, k.default_spread) for k in a.kernels]
    pairs_fla = [(k.momtune_ms, k.fla_ms, k.momtune_spread, k.fla_spread) for k in a.kernels]
    pairs_e2e = [(r.ms.get("momtune"), r.ms.get("fla"), r.spread("momtune"), r.spread("fla")) for r in a.e2e]
    configs = {r.configs for r in a.e2e if "momtune" in r.rows}
    ran = ("momtune: " + " / ".join(CONFIGS_SHORT.get(c, c) for c in sorted(configs))) if configs else ""
    doc.add(Cards([
        ("kernel shapes tuned", str(len(tuned)), f"{len({k.sid.template for k in tuned})} templates", ""),
        _card("vs default config", pairs_def),
        _card("vs fla kernels", pairs_fla),
        _card("vs fla end to end", pairs_e2e, ran),
        ("trials", str(n_trials), f"{sum(t.status == 'ok' for s in inp.studies for t in s.trials)} ok", ""),
    ]))
    toc = [("provenance", "Provenance")] + ([("missing", "Missing inputs")] if a.missing or inp.warnings else [])
    toc += [("kernels", "Kernels"), ("convergence", "Search convergence"), ("importance", "Parameter importance"),
            ("dispatch", "Dispatch quality"), ("failures", "Failures"), ("end-to-end", "End to end"),
            ("training-run", "Training run")]
    doc.add(Toc(toc))
    from .sections_prov import provenance

    provenance(doc, a, built, version)
    if a.missing or inp.warnings:
        _missing(doc, a)
    _kernels(doc, a)
    from .sections_search import convergence, dispatch, failures, importance

    convergence(doc, a)
    importance(doc, a)
    dispatch(doc, a)
    failures(doc, a)
    _end_to_end(doc, a)
    from .sections_train import training

    training(doc, a)
    return subtitle, doc


Pair = tuple[float | None, float | None, float | None, float | None]  # ours, theirs, their spreads


def _card(label: str, pairs: Iterable[Pair], extra: str = "") -> tuple[str, str, str, str]:
    """A geomean speed-up card (theirs / ours): coloured only beyond the typical noise of its
    pairs, with how many single comparisons are wins beyond noise."""
    from momtune.timing import NOISE_FLOOR

    both = [p for p in pairs if p[0] is not None and p[1] is not None and p[0] > 0]
    gm = geomean(p[1] / p[0] for p in both)  # type: ignore[operator]
    noises = [max(UNRECORDED_SPREAD if p[2] is None else p[2], UNRECORDED_SPREAD if p[3] is None else p[3],
                  NOISE_FLOOR) for p in both]
    cell = geomean_cell(gm, statistics.median(noises) if noises else NOISE_FLOOR)
    wins = sum(verdict(*p) == "faster" for p in both)
    detail = f"geomean speed-up · {wins} of {len(both)} beyond noise" if both else "geomean speed-up"
    return (label, cell.text, detail + (f" · {extra}" if extra else ""), cell.cls)


def _missing(doc: Doc, a: Analysis) -> None:
    doc.add(Heading("Missing inputs", 2, "missing"))
    items = [f"**{m.what}** — {m.effect}. Get it with {m.how}." for m in a.missing]
    items += [f"{w}" for w in a.inputs.warnings]
    doc.add(Bullets(items))


def _kernels(doc: Doc, a: Analysis) -> None:
    doc.add(Heading("Kernels", 2, "kernels"))
    if not a.kernels:
        doc.add(Para("No kernel results: no studies, library entries or kernel bench rows."))
        return
    floors = [k for k in a.kernels if k.floor_ms is not None]
    unrec = sum(valid_peak(k.floor_peak) is None for k in floors)
    doc.add(Para("Time of one kernel call per shape, ± its recorded spread. **speed-up** = default / tuned, "
                 "**vs fla** = fla / momtune, **vs ref** = reference / momtune (above 1 means momtune is faster; "
                 "momtune = the bench's momtune time where a bench file timed it, from the same harness as "
                 "fla's, else tuned, else the default); a ratio within the noise of its two times says so and "
                 "is not coloured. **floor** = the byte/FLOP floor (max(FLOPs / peak FLOP/s, bytes / peak "
                 "byte/s)) as a fraction of the tuned time (the default's where nothing was tuned)."))
    if floors:
        doc.add(Para("**Peaks the floors use:** " + peaks_summary([k.floor_peak for k in floors], unrec) + "."))
    multi_gpu = len({k.sid.gpu for k in a.kernels}) > 1
    multi_dtype = len({k.sid.dtype for k in a.kernels}) > 1
    by_tpl: dict[str, list[KernelRow]] = defaultdict(list)
    for k in a.kernels:
        by_tpl[k.sid.template].append(k)
    roofs = rooflines(a, doc.labels)
    for tpl, rows in by_tpl.items():
        doc.add(Heading(tpl, 3))
        unit, f = plots.time_unit([v for k in rows for v in (k.tuned_ms, k.default_ms, k.fla_ms, k.ref_ms)])
        cols = (["GPU"] if multi_gpu else []) + ["shape"] + (["dtype"] if multi_dtype else []) + [
            f"tuned ({unit})", f"default ({unit})", f"fla ({unit})", f"ref ({unit})", "speed-up", "vs fla",
            "vs ref", "floor", "tuned config"]
        body: list[list[Cell | str]] = []
        notes: list[str] = []
        for k in rows:
            body.append(([k.gpu] if multi_gpu else []) + [
                Cell(doc.labels(k.sid), "nw")] + ([k.sid.dtype] if multi_dtype else []) + [
                time_cell(k.tuned_ms, f, k.why.get("momtune", NOTE_TUNED), k.tuned_spread),
                time_cell(k.default_ms, f, k.why.get("momtune-default", NOTE_DEFAULT), k.default_spread),
                time_cell(k.fla_ms, f, k.why.get("fla", NOTE_FLA), k.fla_spread),
                time_cell(k.ref_ms, f, k.why.get("reference", NOTE_REF), k.ref_spread),
                gain_cell(k.default_ms, k.tuned_ms, k.default_spread, k.tuned_spread),
                gain_cell(k.fla_ms, k.momtune_ms, k.fla_spread, k.momtune_spread),
                gain_cell(k.ref_ms, k.momtune_ms, k.ref_spread, k.momtune_spread),
                pct_cell(k.floor_frac) if k.floor_ms is not None else Cell(DASH, "muted", (NOTE_FLOOR,)),
                _config_cell(k)])
            notes += [f"{k.sid.label}: {n}" for n in k.notes if f"{k.sid.label}: {n}" not in notes]
        srcs = sorted({k.tuned_src for k in rows if k.tuned_src})
        notes.append("tuned time from: " + ", ".join(srcs) + "." if srcs else "")
        notes += doc.labels.notes([tpl]) + [spread_note()]
        doc.add(Table(cols, ("l" if multi_gpu else "") + ("ll" if multi_dtype else "l") + "r" * 8 + "l", body,
                      notes=[n for n in notes if n]))
        series = {"momtune": [k.tuned_ms for k in rows], "momtune-default": [k.default_ms for k in rows],
                  "fla": [k.fla_ms for k in rows], "reference": [k.ref_ms for k in rows]}
        where = ", ".join(sorted({k.gpu for k in rows})) + " · " + ", ".join(sorted({k.sid.dtype for k in rows}))
        if sum(v is not None for s in series.values() for v in s) >= 2:
            doc.figure(f"kernels_{slug(tpl)}.png", f"{tpl} kernel times",
                       f"{tpl}: time per call by implementation (lower is better).",
                       lambda p, tpl=tpl, rows=rows, series=series, where=where: plots.grouped_bars(
                           p, f"{tpl} kernel — {where}", [k.sid.label for k in rows], series, a.labels,
                           "time per call"))
        if tpl in roofs:
            _roofline(doc, a, roofs[tpl], where)


def _roofline(doc: Doc, a: Analysis, roof: Roofline, where: str) -> None:
    tpl = roof.template
    if not roof.points:
        doc.add(Para(f"No roofline for {tpl}: no shape has a known cost ("
                     + "; ".join(roof.skipped) + ")."))
        return
    labels = [("measured on " if p.get("measured") else "nominal, not measured: ") + str(p.get("gpu") or "?")
              for p in roof.peaks]
    roofs = (f"roofs from the peaks {peaks_summary(roof.peaks)}" if roof.peaks
             else "no roofs: the peaks of these floors were not recorded")
    caption = (f"{tpl}: roofline — achieved FLOP/s against arithmetic intensity, per shape the tuned config "
               "(filled) and the default (open), log-log. FLOPs and bytes per call from the template's cost "
               "model (`momtune.kernels` template `cost(shape, dtype)`, the one the search's floors use); "
               f"{roofs}.")
    if a.interpreter:
        caption += " Interpreter times: the points say nothing about a GPU."
    doc.figure(f"roofline_{slug(tpl)}.png", f"{tpl} roofline", caption,
               lambda p: plots.roofline(p, f"{tpl}: roofline — {where}", roof.points, roof.peaks, labels))
    extra = [f"no point for {s}" for s in roof.skipped] + roof.checks
    if extra:
        doc.add(Bullets(extra))


def _config_cell(k: KernelRow) -> Cell:
    if not k.default_kept:
        return Cell(config_text(k.tuned_config))
    kept = k.default_kept
    ms = kept.get("time_ms")
    best = (config_text(kept.get("config")) + (f" ({time_text(ms)}{spread_text(kept.get('spread'))})"
                                                if isinstance(ms, (int, float)) else ""))
    return Cell(config_text(k.tuned_config) + " — default kept",
                notes=(f"default kept: the search's fastest, {best}, was within noise of the default config, "
                       "so the default stays (momtune.winner).",))


def _end_to_end(doc: Doc, a: Analysis) -> None:
    doc.add(Heading("End to end", 2, "end-to-end"))
    if not a.e2e:
        doc.add(Para("No layer or model rows in the bench files (see Missing inputs)."))
        return
    unit, f = plots.time_unit([v for r in a.e2e for v in r.ms.values()])
    multi_dtype = len({r.dtype for r in a.e2e}) > 1
    cols = ["kind", "model", "shape"] + (["dtype"] if multi_dtype else []) + ["momtune ran"] + [
        f"{'momtune' if i == 'momtune' else IMPL_SHORT[i]} ({unit})" for i in IMPLS] + [
        "vs default", "vs fla", "vs ref", "tokens/s", "peak MB"]
    body: list[list[Cell | str]] = []
    notes: list[str] = []
    for r in a.e2e:
        shape = " ".join(f"{k}={v}" for k, v in r.shape.items()) or DASH
        m = r.rows.get("momtune")
        ran = Cell(CONFIGS_SHORT.get(r.configs, r.configs), "nw" + (" muted" if r.configs == "not recorded" else ""))
        body.append([r.kind, Cell(r.name, "nw"), Cell(shape, "nw")] + ([r.dtype or DASH] if multi_dtype else [])
                    + [ran if m else Cell(DASH, "muted")]
                    + [time_cell(r.ms.get(i), f, _e2e_why(a, r, i), r.spread(i)) for i in IMPLS]
                    + [gain_cell(r.ms.get(i), r.ms.get("momtune"), r.spread(i), r.spread("momtune"))
                       for i in ("momtune-default", "fla", "reference")]
                    + [Cell(si(m.tokens_per_s)) if m and m.tokens_per_s else Cell(DASH, "muted"),
                       Cell(f"{m.peak_mem_mb:,.0f}") if m and m.peak_mem_mb else Cell(DASH, "muted")])
        for impl, row in r.rows.items():
            if row.note and row.ms is not None:
                notes.append(f"{r.kind} {r.name} {shape}, {a.e2e_labels.get(impl, impl)}: {row.note}")
        if m and m.graph_ms:
            fla = r.ms.get("fla")
            notes.append(f"{r.kind} {r.name} {shape}: momtune in a CUDA graph takes {time_text(m.graph_ms)} per call"
                         + (f" ({fla / m.graph_ms:.2f}× vs fla)." if fla else "."))
    for b in a.inputs.benches:
        if not any(r.kind in ("layer_prefill", "layer_decode", "model_decode", "model_prefill")
                   and r.impl == "momtune" for r in b.rows):
            continue
        if b.configs == "not recorded":
            notes.append(f"{b.path.name}: the bench file does not record which configs momtune ran with "
                         "(a tuned library or the template defaults).")
        elif b.configs == "defaults":
            notes.append(f"{b.path.name}: momtune ran with each template's default config (no tuned library).")
        else:
            notes.append(f"{b.path.name}: momtune ran with the tuned library {b.provenance['momtune_library']}.")
    notes.append(spread_note())
    doc.add(Para("Times per call (a decode row: one step; a prefill row: the whole prompt), ± the min-max spread "
                 "of the timed calls. **vs X** = X's time / momtune's time (above 1: momtune is faster; within "
                 "the noise of the two times it says so). **momtune ran** says which configs momtune used, "
                 "from the bench file: a tuned library, each template's default config, or not recorded. "
                 "tokens/s and peak memory are momtune's."))
    doc.add(Table(cols, ("lllll" if multi_dtype else "llll") + "r" * 9, body, notes=notes))
    labels = [f"{r.kind} {r.name} " + " ".join(f"{k}={v}" for k, v in r.shape.items()) for r in a.e2e]
    series = {i: [r.ms.get(i) for r in a.e2e] for i in IMPLS}
    if not any(v is not None for s in series.values() for v in s):
        return
    doc.figure("end_to_end.png", "end-to-end times",
               f"Layer and model times by implementation (lower is better); momtune is labelled from the bench "
               f"files: {a.e2e_labels['momtune']}.",
               lambda p: plots.grouped_bars(p, f"End to end — {_where(a)}", labels, series, a.e2e_labels,
                                            "time per call"))


def _e2e_why(a: Analysis, r: E2ERow, impl: str) -> str:
    label = a.e2e_labels.get(impl, impl)
    row = r.rows.get(impl)
    if row is not None:
        return f"{label}: {row.note or 'the bench row has no time'} ({row.source})"
    return f"{label}: a {r.kind} row with impl {impl} in a bench file (`momtune bench`)"


def summary_rows(a: Analysis) -> list[list[str]]:
    """Plain rows for the CLI table: template, shape, tuned, default, speed-up, fla, vs fla."""
    return [[k.sid.template, k.sid.label + " " + k.sid.dtype, time_text(k.tuned_ms) + spread_text(k.tuned_spread),
             time_text(k.default_ms) + spread_text(k.default_spread),
             gain_cell(k.default_ms, k.tuned_ms, k.default_spread, k.tuned_spread).text,
             time_text(k.fla_ms) + spread_text(k.fla_spread),
             gain_cell(k.fla_ms, k.momtune_ms, k.fla_spread, k.momtune_spread).text] for k in a.kernels]
