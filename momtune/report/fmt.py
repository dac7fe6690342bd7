"""Number formatting shared by the report's tables and the CLI summary."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from .collect import ShapeId
from .render import Cell

DASH = "—"
GOOD, BAD = 1.05, 0.95  # speed-ups above GOOD are green, below BAD red


def num(v: float) -> str:
    """Three significant digits without exponent noise: 1234 -> "1234", 12.34 -> "12.3"."""
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.1:
        return f"{v:.3f}"
    return f"{v:.3g}"


def si(v: float) -> str:
    """A count with an SI suffix: 3400000 -> "3.40 M"."""
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(v) >= scale:
            return num(v / scale) + suffix
    return num(v)


def time_cell(ms: float | None, factor: float, note: str = "") -> Cell:
    if ms is None:
        return Cell(DASH, "muted", (note,) if note else ())
    return Cell(num(ms * factor))


def time_text(ms: float | None) -> str:
    """A time with its own unit (for prose and the CLI): 40.0 µs, 1.23 ms, 2.50 s."""
    if ms is None:
        return DASH
    if ms < 1:
        return f"{num(ms * 1e3)} µs"
    if ms >= 1e3:
        return f"{num(ms / 1e3)} s"
    return f"{num(ms)} ms"


def speedup_cell(r: float | None) -> Cell:
    if r is None:
        return Cell(DASH, "muted")
    return Cell(f"{r:.2f}×", "good" if r >= GOOD else "bad" if r < BAD else "")


def regret_cell(r: float | None, missing: str = DASH) -> Cell:
    """picked/best time: 1.00× is perfect, larger is worse."""
    if r is None:
        return Cell(missing, "muted")
    return Cell(f"{r:.2f}×", "good" if r <= 1.02 else "bad" if r > 1.10 else "")


def pct_cell(frac: float | None) -> Cell:
    if frac is None:
        return Cell(DASH, "muted")
    if frac < 0.001:
        return Cell("<0.1%")
    return Cell(f"{frac * 100:.1f}%" if frac < 0.1 else f"{frac * 100:.0f}%")


def config_text(config: Mapping[str, Any] | None) -> str:
    if not config:
        return DASH
    return "`" + " ".join(f"{k}={v}" for k, v in config.items()) + "`"


def geomean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


class ShapeLabels:
    """Short shape labels: per template, only the keys that vary between its shapes (the
    common ones go into a table note)."""

    def __init__(self, sids: Iterable[ShapeId]) -> None:
        by_tpl: dict[str, set[tuple[tuple[str, int], ...]]] = {}
        for sid in sids:
            by_tpl.setdefault(sid.template, set()).add(sid.shape)
        self.common: dict[str, dict[str, int]] = {}
        for tpl, shapes in by_tpl.items():
            if len(shapes) > 1:
                first, *rest = [dict(s) for s in shapes]
                self.common[tpl] = {k: v for k, v in first.items() if all(r.get(k) == v for r in rest)}

    def __call__(self, sid: ShapeId) -> str:
        common = self.common.get(sid.template, {})
        return " ".join(f"{k}={v}" for k, v in sid.shape if common.get(k) != v) or sid.label

    def notes(self, templates: Iterable[str]) -> list[str]:
        return [f"all {t} shapes have " + " ".join(f"{k}={v}" for k, v in self.common[t].items()) + "."
                for t in sorted(set(templates)) if self.common.get(t)]
