"""The report's sections as document blocks (see render.py); figures are written on the way."""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import plots
from .analyze import IMPL_LABELS, IMPL_SHORT, IMPLS, Analysis, E2ERow, KernelRow
from .collect import slug
from .fmt import DASH, ShapeLabels, config_text, geomean, pct_cell, si, speedup_cell, time_cell, time_text
from .render import Banner, Block, Bullets, Cards, Cell, Figure, Heading, Para, Table, Toc

INTERPRETER_BANNER = "interpreter timings — not GPU performance"
NOTE_TUNED = ("tuned time: a library from `momtune export` (--library) or a finished study from "
              "`momtune search` (--storage)")
NOTE_DEFAULT = "default time: recorded by `momtune search` (study attr default_time_ms) or `momtune export`"
NOTE_FLA = ("fla time: kernel rows for impl fla in a bench file (`momtune bench --out FILE` with "
            "flash-linear-attention 0.6.0 installed; pass --bench FILE)")
NOTE_REF = ("reference time: kernel rows for impl reference in a bench file (`momtune bench --out FILE`; "
            "pass --bench FILE)")
NOTE_FLOOR = "floor: study attr floor_ms (`momtune search`) or floor_ms of a bench row (`momtune bench`)"


@dataclass
class Doc:
    """Blocks in order, plus the PNGs written for them."""

    outdir: Path
    labels: ShapeLabels
    blocks: list[Block] = field(default_factory=list)
    pngs: list[str] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    def figure(self, name: str, alt: str, caption: str, draw: Callable[[Path], None]) -> None:
        draw(self.outdir / name)
        self.pngs.append(name)
        self.add(Figure(name, alt, caption))


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
    subtitle = f"Built {built} from " + ", ".join(sources) + "."
    if a.interpreter:
        doc.add(Banner(INTERPRETER_BANNER + ": some studies or benches ran in the Triton interpreter "
                       "(TRITON_INTERPRET=1) on the CPU; their times say nothing about a GPU."))
    tuned = [k for k in a.kernels if k.tuned_ms is not None]
    gm_def = geomean(k.speedup for k in a.kernels)
    gm_fla = geomean(k.vs_fla for k in a.kernels)
    gm_e2e = geomean(r.vs("fla") for r in a.e2e)
    doc.add(Cards([
        ("kernel shapes tuned", str(len(tuned)), f"{len({k.sid.template for k in tuned})} templates", ""),
        ("vs default config", f"{gm_def:.2f}×" if gm_def else DASH, "geomean speed-up", _cls(gm_def)),
        ("vs fla kernels", f"{gm_fla:.2f}×" if gm_fla else DASH, "geomean speed-up", _cls(gm_fla)),
        ("vs fla end to end", f"{gm_e2e:.2f}×" if gm_e2e else DASH, "geomean speed-up", _cls(gm_e2e)),
        ("trials", str(n_trials), f"{sum(t.status == 'ok' for s in inp.studies for t in s.trials)} ok", ""),
    ]))
    toc = [("provenance", "Provenance")] + ([("missing", "Missing inputs")] if a.missing or inp.warnings else [])
    toc += [("kernels", "Kernels"), ("convergence", "Search convergence"), ("importance", "Parameter importance"),
            ("dispatch", "Dispatch quality"), ("failures", "Failures"), ("end-to-end", "End to end")]
    doc.add(Toc(toc))
    _provenance(doc, a, built, version)
    if a.missing or inp.warnings:
        _missing(doc, a)
    _kernels(doc, a)
    from .sections_search import convergence, dispatch, failures, importance

    convergence(doc, a)
    importance(doc, a)
    dispatch(doc, a)
    failures(doc, a)
    _end_to_end(doc, a)
    return subtitle, doc


def _cls(r: float | None) -> str:
    return speedup_cell(r).cls


PROV_KEYS = ("gpu", "capability", "sm_count", "driver", "cuda", "torch", "triton", "momtune", "commit", "created")


def _prov_text(key: str, v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ".".join(map(str, v))
    text = str(v)
    if key == "commit" and len(text) > 12 and all(c in "0123456789abcdef" for c in text):
        return text[:12]
    return text


def _provenance(doc: Doc, a: Analysis, built: str, version: str) -> None:
    """One row per input and distinct provenance; studies that differ only in their date share a row."""
    doc.add(Heading("Provenance", 2, "provenance"))
    sources: list[tuple[str, dict[str, Any]]] = []
    if a.inputs.library:
        sources.append((f"library {a.inputs.library.path.name}", a.inputs.library.provenance))
    sources += [(f"bench {b.path.name}", b.provenance) for b in a.inputs.benches]
    for s in a.inputs.studies:
        prov = dict(s.provenance) or {"gpu": s.gpu}
        prov.setdefault("gpu", s.gpu)
        sources.append(("studies", prov))
    groups: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for name, prov in sources:
        key = (name, json.dumps([_prov_text(k, prov.get(k)) for k in PROV_KEYS[:-1]]))
        names, dates = groups.setdefault(key, ([], []))
        names.append(name)
        if prov.get("created"):  # ISO dates, shown to the minute
            dates.append(str(prov["created"])[:16].replace("T", " "))
    rows: list[list[Cell | str]] = []
    for (name, key), (names, dates) in groups.items():
        label = f"{name} ({len(names)})" if name == "studies" else name
        values = json.loads(key)
        created = (min(dates) if len(set(dates)) == 1 else f"{min(dates)} … {max(dates)}") if dates else ""
        rows.append([Cell(label, "nw")] + [Cell(v) if v not in ("None", "") else Cell(DASH, "muted") for v in values]
                    + [Cell(created) if created else Cell(DASH, "muted")])
    if rows:
        doc.add(Table(["source", "GPU", "capability", "SMs", "driver", "CUDA", "torch", "Triton", "momtune",
                       "commit", "created"], "l" * 11, rows))
    commit = a.inputs.repo_commit or "not a git checkout"
    doc.add(Para(f"Report built {built} by momtune {version} (commit `{commit}`), from stored results only: "
                 "nothing was re-run.", "sub"))


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
    doc.add(Para("Time of one kernel call per shape. **speed-up** = default / tuned, **vs fla** = fla / momtune, "
                 "**vs ref** = reference / momtune (above 1 means momtune is faster; momtune = the bench's "
                 "momtune time where a bench file timed it, from the same harness as fla's, else tuned, else "
                 "the default); **floor** = the byte/FLOP floor (max(FLOPs / peak, bytes / bandwidth)) as a "
                 "fraction of the tuned time (the default's where nothing was tuned)."))
    multi_gpu = len({k.sid.gpu for k in a.kernels}) > 1
    multi_dtype = len({k.sid.dtype for k in a.kernels}) > 1
    by_tpl: dict[str, list[KernelRow]] = defaultdict(list)
    for k in a.kernels:
        by_tpl[k.sid.template].append(k)
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
                time_cell(k.tuned_ms, f, k.why.get("momtune", NOTE_TUNED)),
                time_cell(k.default_ms, f, k.why.get("momtune-default", NOTE_DEFAULT)),
                time_cell(k.fla_ms, f, k.why.get("fla", NOTE_FLA)),
                time_cell(k.ref_ms, f, k.why.get("reference", NOTE_REF)),
                speedup_cell(k.speedup), speedup_cell(k.vs_fla), speedup_cell(k.vs_ref),
                pct_cell(k.floor_frac) if k.floor_ms is not None else Cell(DASH, "muted", (NOTE_FLOOR,)),
                config_text(k.tuned_config)])
            notes += [f"{k.sid.label}: {n}" for n in k.notes if f"{k.sid.label}: {n}" not in notes]
        srcs = sorted({k.tuned_src for k in rows if k.tuned_src})
        notes.append("tuned time from: " + ", ".join(srcs) + "." if srcs else "")
        notes += doc.labels.notes([tpl])
        doc.add(Table(cols, ("l" if multi_gpu else "") + ("ll" if multi_dtype else "l") + "r" * 8 + "l", body,
                      notes=[n for n in notes if n]))
        series = {"momtune": [k.tuned_ms for k in rows], "momtune-default": [k.default_ms for k in rows],
                  "fla": [k.fla_ms for k in rows], "reference": [k.ref_ms for k in rows]}
        if sum(v is not None for s in series.values() for v in s) >= 2:
            where = ", ".join(sorted({k.gpu for k in rows})) + " · " + ", ".join(sorted({k.sid.dtype for k in rows}))
            doc.figure(f"kernels_{slug(tpl)}.png", f"{tpl} kernel times",
                       f"{tpl}: time per call by implementation (lower is better).",
                       lambda p, tpl=tpl, rows=rows, series=series, where=where: plots.grouped_bars(
                           p, f"{tpl} kernel — {where}", [k.sid.label for k in rows], series, IMPL_LABELS,
                           "time per call"))


def _end_to_end(doc: Doc, a: Analysis) -> None:
    doc.add(Heading("End to end", 2, "end-to-end"))
    if not a.e2e:
        doc.add(Para("No layer or model rows in the bench files (see Missing inputs)."))
        return
    unit, f = plots.time_unit([v for r in a.e2e for v in r.ms.values()])
    multi_dtype = len({r.dtype for r in a.e2e}) > 1
    cols = ["kind", "model", "shape"] + (["dtype"] if multi_dtype else []) + [
        f"{'momtune' if i == 'momtune' else IMPL_SHORT[i]} ({unit})" for i in IMPLS] + [
        "vs default", "vs fla", "vs ref", "tokens/s", "peak MB"]
    body: list[list[Cell | str]] = []
    notes: list[str] = []
    for r in a.e2e:
        shape = " ".join(f"{k}={v}" for k, v in r.shape.items()) or DASH
        m = r.rows.get("momtune")
        body.append([r.kind, Cell(r.name, "nw"), Cell(shape, "nw")] + ([r.dtype or DASH] if multi_dtype else [])
                    + [time_cell(r.ms.get(i), f, _e2e_why(r, i)) for i in IMPLS]
                    + [speedup_cell(r.vs(i)) for i in ("momtune-default", "fla", "reference")]
                    + [Cell(si(m.tokens_per_s)) if m and m.tokens_per_s else Cell(DASH, "muted"),
                       Cell(f"{m.peak_mem_mb:,.0f}") if m and m.peak_mem_mb else Cell(DASH, "muted")])
        for impl, row in r.rows.items():
            if row.note and row.ms is not None:
                notes.append(f"{r.kind} {r.name} {shape}, {IMPL_LABELS.get(impl, impl)}: {row.note}")
        if m and m.graph_ms:
            fla = r.ms.get("fla")
            notes.append(f"{r.kind} {r.name} {shape}: momtune in a CUDA graph takes {time_text(m.graph_ms)} per call"
                         + (f" ({fla / m.graph_ms:.2f}× vs fla)." if fla else "."))
    for b in a.inputs.benches:
        if not any(r.kind in ("layer_prefill", "layer_decode", "model_decode") and r.impl == "momtune" for r in b.rows):
            continue
        if "momtune_library" not in b.provenance:
            notes.append(f"{b.path.name}: the bench file does not record which configs momtune ran with "
                         "(a tuned library or the template defaults).")
        elif b.provenance["momtune_library"] is None:
            notes.append(f"{b.path.name}: momtune ran with each template's default config (no tuned library).")
        else:
            notes.append(f"{b.path.name}: momtune ran with the tuned library {b.provenance['momtune_library']}.")
    doc.add(Para("Times per call (a decode row: one step; a prefill row: the whole prompt). "
                 "**vs X** = X's time / momtune's time (above 1: momtune is faster); tokens/s and peak "
                 "memory are momtune's. Which configs momtune ran with (tuned library or defaults) is noted "
                 "under the table."))
    doc.add(Table(cols, ("llll" if multi_dtype else "lll") + "r" * 9, body, notes=notes))
    labels = [f"{r.kind} {r.name} " + " ".join(f"{k}={v}" for k, v in r.shape.items()) for r in a.e2e]
    series = {i: [r.ms.get(i) for r in a.e2e] for i in IMPLS}
    if not any(v is not None for s in series.values() for v in s):
        return
    doc.figure("end_to_end.png", "end-to-end times", "Layer and model times by implementation (lower is better).",
               lambda p: plots.grouped_bars(p, f"End to end — {_where(a)}", labels, series, IMPL_LABELS,
                                            "time per call"))


def _e2e_why(r: E2ERow, impl: str) -> str:
    row = r.rows.get(impl)
    if row is not None:
        return f"{IMPL_LABELS[impl]}: {row.note or 'the bench row has no time'} ({row.source})"
    return f"{IMPL_LABELS[impl]}: a {r.kind} row with impl {impl} in a bench file (`momtune bench`)"


def summary_rows(a: Analysis) -> list[list[str]]:
    """Plain rows for the CLI table: template, shape, tuned, default, speed-up, fla, vs fla."""
    return [[k.sid.template, k.sid.label + " " + k.sid.dtype, time_text(k.tuned_ms), time_text(k.default_ms),
             speedup_cell(k.speedup).text, time_text(k.fla_ms), speedup_cell(k.vs_fla).text] for k in a.kernels]
