"""Number formatting shared by the report's tables and the CLI summary: times with their spread,
and gains judged against the noise of the two times they compare (momtune.timing.judge)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from .collect import ShapeId
from .render import Cell

DASH = "—"
WITHIN_NOISE = "within noise"
#: the noise assumed for a time whose spread was not recorded (data from before spreads were kept):
#: the threshold the report used then, so an unmeasured noise never makes a small gain a win
UNRECORDED_SPREAD = 0.05
NOTE_SPREAD = ("±: the time's relative spread as recorded (trials and re-timed winners: (q3 - q1) / median of "
               "the runs; bench rows: (max - min) / median of the timed calls). A ratio is green (red) only "
               "when the two times differ by more than the larger of their spreads and at least {floor:.0%} "
               "(momtune.timing.judge), else it says \"within noise\"; a time without a recorded spread "
               "counts as ±{unrec:.0%}.")


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


def spread_text(spread: float | None) -> str:
    """" ±3%", " ±1.5%", " ±0.4%" (two significant digits); "" when not recorded."""
    if spread is None:
        return ""
    pct = spread * 100
    return f" ±{pct:.0f}%" if pct >= 99.5 else f" ±{pct:.2g}%"


NOTE_NO_SPREAD = "no spread recorded for this time (older data, or a time no re-timing measured)"
_UNSET = float("nan")


def time_cell(ms: float | None, factor: float, note: str = "", spread: float | None = _UNSET) -> Cell:
    """A time in the table's unit, with its spread (±x%); a time whose spread is None gets a
    footnote saying none was recorded (leave ``spread`` out where a spread means nothing)."""
    if ms is None:
        return Cell(DASH, "muted", (note,) if note else ())
    if spread is None:
        return Cell(num(ms * factor), notes=(NOTE_NO_SPREAD,))
    return Cell(num(ms * factor) + ("" if spread is _UNSET else spread_text(spread)))


def spread_note() -> str:
    from momtune.timing import NOISE_FLOOR

    return NOTE_SPREAD.format(floor=NOISE_FLOOR, unrec=UNRECORDED_SPREAD)


def verdict(ours_ms: float | None, theirs_ms: float | None, ours_spread: float | None,
            theirs_spread: float | None) -> str | None:
    """momtune.timing.judge of our time against theirs: "faster" (a win), "slower" or "within
    noise"; an unrecorded spread counts as UNRECORDED_SPREAD. None when a time is missing."""
    from momtune.timing import judge

    if ours_ms is None or theirs_ms is None or ours_ms <= 0 or theirs_ms <= 0:
        return None
    unrec = UNRECORDED_SPREAD
    return judge(ours_ms, theirs_ms, unrec if ours_spread is None else ours_spread,
                 unrec if theirs_spread is None else theirs_spread)


def gain_cell(theirs_ms: float | None, ours_ms: float | None, theirs_spread: float | None = None,
              ours_spread: float | None = None) -> Cell:
    """theirs / ours (above 1: ours is faster), green only for a win beyond noise, red only for a
    loss beyond noise, else marked "within noise"."""
    r = ratio_of(theirs_ms, ours_ms)
    if r is None:
        return Cell(DASH, "muted")
    v = verdict(ours_ms, theirs_ms, ours_spread, theirs_spread)
    if v == "faster":
        return Cell(f"{r:.2f}×", "good")
    if v == "slower":
        return Cell(f"{r:.2f}×", "bad")
    return Cell(f"{r:.2f}× {WITHIN_NOISE}", "noise")


def ratio_of(num_ms: float | None, den_ms: float | None) -> float | None:
    return num_ms / den_ms if num_ms is not None and den_ms is not None and den_ms > 0 else None


def time_text(ms: float | None) -> str:
    """A time with its own unit (for prose and the CLI): 40.0 µs, 1.23 ms, 2.50 s."""
    if ms is None:
        return DASH
    if ms < 1:
        return f"{num(ms * 1e3)} µs"
    if ms >= 1e3:
        return f"{num(ms / 1e3)} s"
    return f"{num(ms)} ms"


def geomean_cell(r: float | None, noise: float) -> Cell:
    """A geometric mean of ratios, coloured only beyond ``noise`` (the typical spread, at least
    NOISE_FLOOR) either way."""
    if r is None:
        return Cell(DASH, "muted")
    if r > 1 + noise:
        return Cell(f"{r:.2f}×", "good")
    if r < 1 / (1 + noise):
        return Cell(f"{r:.2f}×", "bad")
    return Cell(f"{r:.2f}×", "noise")


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
