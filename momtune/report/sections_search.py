"""Sections about the searches themselves: convergence, parameter importance, dispatch quality
and failure counts."""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from . import plots
from .analyze import NEAR_OPTIMUM, STATUSES, Analysis, DispatchRow
from .collect import MIN_IMPORTANCE_TRIALS, ShapeId, Study, slug
from .fmt import DASH, config_text, gain_cell, regret_cell, spread_note, time_cell
from .render import Bullets, Cell, Heading, Para, Table

if TYPE_CHECKING:
    from .doc import Doc


def _where(studies: list[Study]) -> str:
    return ", ".join(sorted({s.gpu for s in studies})) + " · " + ", ".join(sorted({s.dtype for s in studies}))


def _by_template(a: Analysis) -> dict[str, dict[ShapeId, list[Study]]]:
    out: dict[str, dict[ShapeId, list[Study]]] = defaultdict(dict)
    for sid, studies in sorted(a.by_sid().items(), key=lambda kv: (kv[0].template, kv[0].gpu, kv[0].shape)):
        out[sid.template][sid] = studies
    return out


def convergence(doc: "Doc", a: Analysis) -> None:
    doc.add(Heading("Search convergence", 2, "convergence"))
    if not a.summaries:
        doc.add(Para("No studies (see Missing inputs)."))
        return
    doc.add(Para("Best time found so far against trial number, one panel per shape and one line per sampler; "
                 "the dashed line is the optimum of an exhaustive study of the same shape where one exists, the "
                 "dotted line the default config. Failed and pruned trials count as trials."))
    for tpl, shapes in _by_template(a).items():
        studies = [s for ss in shapes.values() for s in ss]
        panels = [(sid.label + (f" · {sid.gpu}" if len(a.gpus) > 1 else ""), ss) for sid, ss in shapes.items()]
        doc.figure(f"convergence_{slug(tpl)}.png", f"{tpl} search convergence",
                   f"{tpl}: best time so far per trial ({len(studies)} stud{'y' if len(studies) == 1 else 'ies'}).",
                   lambda p, tpl=tpl, panels=panels, studies=studies: plots.convergence(
                       p, f"{tpl}: search convergence — {_where(studies)}", panels))
    unit, f = plots.time_unit([s.best_ms for s in a.summaries])
    body: list[list[Cell | str]] = []
    for sm in a.summaries:
        s = sm.study
        reach = (Cell(str(sm.trials_to_target)) if sm.trials_to_target is not None
                 else Cell("not reached", "bad") if sm.target_ms is not None else Cell(DASH, "muted"))
        best_spread = min((t for t in s.ok_trials), key=lambda t: t.time_ms or 0.0).spread if s.ok_trials else None
        body.append([s.template, Cell(doc.labels(s.key), "nw"), s.label,
                     str(len(s.trials)), str(sm.complete), str(sm.failed), str(sm.pruned),
                     time_cell(sm.best_ms, f, spread=best_spread),
                     time_cell(s.default_time_ms, f, spread=s.default_spread),
                     gain_cell(s.default_time_ms, sm.best_ms, s.default_spread, best_spread),
                     reach])
    doc.add(Table(["template", "shape", "sampler", "trials", "ok", "failed", "pruned", f"best ({unit})",
                   f"default ({unit})", "speed-up", "trials to optimum"],
                  "lll" + "r" * 8, body,
                  notes=[f"trials to optimum: trials until one within {(NEAR_OPTIMUM - 1) * 100:.0f}% of the "
                         "optimum — the exhaustive study's best where one exists, else the best of all the shape's "
                         "studies. Times here are trial times (the exported winner is re-timed)."]
                  + doc.labels.notes(s.study.template for s in a.summaries) + [spread_note()]))


def importance(doc: "Doc", a: Analysis) -> None:
    doc.add(Heading("Parameter importance", 2, "importance"))
    if not a.inputs.studies:
        doc.add(Para("No studies (see Missing inputs)."))
        return
    methods = sorted({s.importance.method for s in a.inputs.studies if s.importance.values})
    doc.add(Para("How much of the variation of the time each parameter explains, per study (complete trials "
                 f"only; at least {MIN_IMPORTANCE_TRIALS} and two varying parameters needed). Method: "
                 + ("; ".join(methods) if methods else "none computed") + "."))
    body: list[list[Cell | str]] = []
    for tpl, shapes in _by_template(a).items():
        studies = [s for ss in shapes.values() for s in ss]
        good = [s for s in studies if s.importance.values]
        for s in studies:
            vals = s.importance.values
            text = " · ".join(f"{k} {v:.2f}" for k, v in list(vals.items())[:5]) if vals else s.importance.note
            body.append([tpl, Cell(doc.labels(s.key), "nw"), s.label,
                         str(len(s.ok_trials)), Cell(text, "" if vals else "muted")])
        if good:
            doc.figure(f"importance_{slug(tpl)}.png", f"{tpl} parameter importance",
                       f"{tpl}: parameter importance (bars: mean over {len(good)} studies; dots: single studies).",
                       lambda p, tpl=tpl, good=good: plots.importance(
                           p, f"{tpl}: parameter importance — {_where(good)}",
                           [(s.name, s.importance.values) for s in good]))
    doc.add(Table(["template", "shape", "sampler", "complete trials", "importance (largest first)"], "lllrl", body,
                  notes=doc.labels.notes(s.template for s in a.inputs.studies)))


def _dispatch_rows(doc: "Doc", rows: list[DispatchRow], held: bool) -> Table:
    unit, f = plots.time_unit([v for r in rows for v in (r.picked_ms, r.best_ms)])
    body: list[list[Cell | str]] = []
    for r in rows:
        picked = time_cell(r.picked_ms, f) if r.picked_ms is not None else Cell(
            "not measured" if r.config else DASH, "muted")
        lead: list[Cell | str] = [r.sid.template, Cell(doc.labels(r.sid), "nw")]
        if held:
            lead.append(Cell(doc.labels(r.neighbour), "nw") if r.neighbour
                        else Cell("none with the same non-size keys", "muted"))
        else:
            lead.append(r.source)
        if r.picked_ms is not None:
            picked = time_cell(r.picked_ms, f, spread=r.picked_spread)
        body.append(lead + [config_text(r.config), picked, time_cell(r.best_ms, f, spread=r.best_spread),
                            regret_cell(r.regret, "not measured" if r.config else DASH)])
    cols = ["template", "shape", "nearest other tuned shape" if held else "source", "config",
            f"its time here ({unit})" if held else f"picked ({unit})", f"shape's best ({unit})", "picked / best"]
    return Table(cols, "llll" + "rrr", body, notes=doc.labels.notes(r.sid.template for r in rows)
                 + ["Times here are trial times, ± their recorded spread."])


def dispatch(doc: "Doc", a: Analysis) -> None:
    doc.add(Heading("Dispatch quality", 2, "dispatch"))
    if not a.inputs.studies:
        doc.add(Para("No studies to measure dispatch against (see Missing inputs)."))
        return
    if a.dispatch:
        doc.add(Para(f"For each shape with a study: the config dispatch picks from the library ({a.dispatch_method}) "
                     "and its measured trial time on that shape, against the shape's best trial. "
                     "**picked / best** = 1.00× is perfect; \"not measured\" = the search never ran that config on "
                     "that shape."))
        doc.add(_dispatch_rows(doc, a.dispatch, held=False))
    elif a.inputs.library is None:
        doc.add(Para("No library given, so no dispatch view (see Missing inputs)."))
    else:
        doc.add(Para("The library's GPU matches none of the studies' GPUs; no dispatch view."))
    if a.held_out:
        doc.add(Heading("Held-out shapes", 3))
        doc.add(Para("Leave one out: each tuned shape is removed and gets the winner of the nearest other tuned "
                     "shape (same template, dtype and non-size keys; nearest by log distance of the size keys) — "
                     "how well dispatch would do for a shape nobody tuned."))
        doc.add(_dispatch_rows(doc, a.held_out, held=True))


def failures(doc: "Doc", a: Analysis) -> None:
    doc.add(Heading("Failures", 2, "failures"))
    if not a.failures:
        doc.add(Para("No studies (see Missing inputs)."))
        return
    doc.add(Para("Trials by outcome (trial attr `status`). A failed candidate is a recorded outcome, not a crash "
                 "of the search; `invalid_config` trials are pruned before they run; `lost` trials died with their "
                 "process and are not counted as run."))
    kinds = [k for k in STATUSES if any(c.get(k) for c in a.failures.values())]
    kinds += sorted({k for c in a.failures.values() for k in c} - set(kinds))
    body: list[list[Cell | str]] = []
    for tpl in sorted(a.failures):
        c = a.failures[tpl]
        total = sum(c.values())
        ran = total - sum(c.get(k, 0) for k in ("invalid_config", "lost", "running", "waiting"))
        failed = ran - c.get("ok", 0)
        rate = Cell(f"{failed / ran * 100:.0f}%", "bad" if failed / ran > 0.5 else "") if ran else Cell(DASH, "muted")
        body.append([tpl] + [Cell(str(c.get(k, 0)), "" if c.get(k) else "muted") for k in kinds] + [str(total), rate])
    doc.add(Table(["template"] + kinds + ["total", "failed of run"], "l" + "r" * (len(kinds) + 2), body))
    reasons = [f"{tpl} · `{status}` ({a.failures[tpl][status]}×), most common: {reason}"
               for (tpl, status), reason in sorted(a.top_reasons.items())]
    if reasons:
        doc.add(Para("Most common reason per template and kind:"), Bullets(reasons))
