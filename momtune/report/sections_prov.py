"""The provenance section: where every input was measured (GPU, driver, Python, torch, Triton,
fla, momtune, commit) and which peaks its floors use, one column per input (training runs too)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .analyze import Analysis
from .collect import Study, bench_configs
from .fmt import DASH
from .peaks import NOT_RECORDED, peak_key, peak_text, peaks_summary, valid_peak
from .render import Cell, Heading, Para, Table

if TYPE_CHECKING:
    from .doc import Doc

# (provenance key, row label); a key missing from an input is "not recorded" (older data)
FIELDS = (("gpu", "GPU"), ("capability", "capability"), ("sm_count", "SMs"), ("driver", "driver"),
          ("cuda", "CUDA"), ("python", "Python"), ("torch", "torch"), ("triton", "Triton"), ("fla", "fla"),
          ("momtune", "momtune"), ("commit", "commit"))


def value_text(key: str, prov: dict[str, Any]) -> Cell:
    if key not in prov:
        return Cell(NOT_RECORDED, "muted")
    v = prov[key]
    if v is None or v == "":
        return Cell(DASH, "muted")
    if isinstance(v, (list, tuple)):
        return Cell(".".join(map(str, v)))
    text = str(v)
    if key == "commit" and len(text) > 12 and all(c in "0123456789abcdef" for c in text[:40]):
        text = text[:12] + ("-dirty" if text.endswith("-dirty") else "")
    return Cell(text)


def _dates(provs: list[dict[str, Any]]) -> Cell:
    dates = sorted(str(p["created"])[:16].replace("T", " ") for p in provs if p.get("created"))
    if not dates:
        return Cell(NOT_RECORDED, "muted")
    return Cell(dates[0] if dates[0] == dates[-1] else f"{dates[0]} … {dates[-1]}")


def _study_groups(studies: list[Study]) -> list[tuple[list[Study], dict[str, Any]]]:
    """Studies with the same provenance (but their dates) and peaks share a column."""
    groups: dict[str, tuple[list[Study], dict[str, Any]]] = {}
    for s in studies:
        prov = dict(s.provenance) or {"gpu": s.gpu}
        prov.setdefault("gpu", s.gpu)
        peak = valid_peak(s.floor_peak)
        key = json.dumps([[k, prov.get(k, NOT_RECORDED)] for k, _ in FIELDS] + [peak_key(peak) if peak else None],
                         default=str)
        groups.setdefault(key, ([], prov))[0].append(s)
    return list(groups.values())


def _configs_text(prov: dict[str, Any]) -> Cell:
    configs = bench_configs(prov)
    if configs == NOT_RECORDED:
        return Cell(NOT_RECORDED, "muted")
    if configs == "defaults":
        return Cell("each template's default config (no tuned library)")
    return Cell(f"tuned library `{str(prov['momtune_library']).rsplit('/', 1)[-1]}`")


def _dtypes(a: Analysis) -> list[Cell]:
    """The dtypes of each input, in the columns' order (studies, library, benches, training runs)."""
    def cell(dtypes: set[str]) -> Cell:
        return Cell(", ".join(sorted(dtypes))) if dtypes else Cell(NOT_RECORDED, "muted")

    inp = a.inputs
    out = [cell({s.dtype for s in studies if s.dtype}) for studies, _ in _study_groups(inp.studies)]
    if inp.library:
        out.append(cell({e.dtype for e in inp.library.entries if e.dtype}))
    out += [cell({r.dtype for r in b.rows if r.dtype}) for b in inp.benches]
    out += [cell({t.dtype} if t.data.get("dtype") else set()) for t in inp.train_runs]
    return out


def provenance(doc: "Doc", a: Analysis, built: str, version: str) -> None:
    doc.add(Heading("Provenance", 2, "provenance"))
    inp = a.inputs
    # (column title, provenance, peaks cell, momtune configs cell or None, dates)
    cols: list[tuple[str, dict[str, Any], Cell, Cell | None, Cell]] = []
    groups = _study_groups(inp.studies)
    for i, (studies, prov) in enumerate(groups):
        n = len(studies)
        title = f"studies ({n})" if len(groups) == 1 else f"studies {i + 1} ({n})"
        peaks = [s.floor_peak for s in studies]
        unrec = sum(valid_peak(p) is None for p in peaks)
        text = peaks_summary(peaks, unrec) if unrec < n else NOT_RECORDED
        cols.append((title, prov, Cell(text, "muted" if text == NOT_RECORDED else ""), None,
                     _dates([dict(s.provenance) for s in studies])))
    if inp.library:
        prov = inp.library.provenance
        text = peak_text(prov.get("floor_peak"))
        cols.append((f"library {inp.library.path.name}", prov, Cell(text, "muted" if text == NOT_RECORDED else ""),
                     None, _dates([prov])))
    for b in inp.benches:
        text = peak_text(b.provenance.get("floor_peak") or b.provenance.get("peaks"))
        cols.append((f"bench {b.path.name}", b.provenance, Cell(text, "muted" if text == NOT_RECORDED else ""),
                     _configs_text(b.provenance), _dates([b.provenance])))
    for t in inp.train_runs:  # no floors: a training run times whole steps
        cols.append((f"training run {t.path.name}", t.provenance, Cell(DASH, "muted"), _configs_text(t.provenance),
                     _dates([t.provenance])))
    if cols:
        rows: list[list[Cell | str]] = []
        for key, label in FIELDS:
            rows.append([Cell(label, "nw")] + [value_text(key, prov) for _, prov, _, _, _ in cols])
        if inp.train_runs:
            rows.append([Cell("dtype", "nw")] + _dtypes(a))
        rows.append([Cell("floor peaks", "nw")] + [c[2] for c in cols])
        if inp.benches or inp.train_runs:
            rows.append([Cell("momtune ran with", "nw")] + [c[3] if c[3] else Cell(DASH, "muted") for c in cols])
        rows.append([Cell("created", "nw")] + [c[4] for c in cols])
        hows = sorted({str(p["how"]) for s in inp.studies if (p := valid_peak(s.floor_peak)) and p.get("how")})
        notes = [f"{NOT_RECORDED}: the input predates that field (momtune records it since issue 13); "
                 f"{DASH}: recorded as none (e.g. no driver in the interpreter).",
                 "floor peaks: the FLOP/s and byte/s every floor and roofline of that input is computed from."]
        notes += [f"peaks measured by the search: {h}." for h in hows]
        if inp.train_runs:
            notes.append("training run: `bench/gpu_train_run.py` records the device and dtype, and this provenance "
                         f"since 2026-11-29 (after session 13); an older file shows {NOT_RECORDED} for the rest.")
        doc.add(Table(["", *(c[0] for c in cols)], "l" * (len(cols) + 1), rows, notes=notes))
    commit = inp.repo_commit or "not a git checkout"
    doc.add(Para(f"Report built {built} by momtune {version} (commit `{commit}`), from stored results only: "
                 "nothing was re-run.", "sub"))
