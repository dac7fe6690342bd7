"""The GPU peaks a report's floors use, and each template's roofline points, as plain data.

A study records the peaks its ``floor_ms`` was computed from (study attr ``floor_peak``): measured
on its GPU by the search (copy bandwidth and bf16 GEMM rate, ``measured: true``), or nominal ones
where nothing was measured (the interpreter; ``measured: false``). Older studies record none. The
report shows which, never assumes any: no peak numbers live in this package.

A roofline point needs a shape's cost (FLOPs, bytes). ``floor_ms`` alone cannot give both (it is
the larger of two quotients), so the cost is the template's own ``cost(shape, dtype)`` (the
function the search computed the floor with), read through ``momtune.kernels.get_template``;
where the recorded floor and peaks are known they are checked against it.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .collect import num_or_none
from .fmt import num

if TYPE_CHECKING:
    from .analyze import Analysis

NOT_RECORDED = "not recorded"


def valid_peak(p: Any) -> dict[str, Any] | None:
    """``p`` when it holds finite positive FLOP/s and B/s, else None."""
    if not isinstance(p, Mapping):
        return None
    f, b = num_or_none(p.get("flops_per_s")), num_or_none(p.get("bytes_per_s"))
    return dict(p) if f and b and f > 0 and b > 0 else None


def peak_key(p: Mapping[str, Any]) -> str:
    return json.dumps([p.get("gpu"), bool(p.get("measured")), p.get("flops_per_s"), p.get("bytes_per_s")])


def rates_text(p: Mapping[str, Any]) -> str:
    return f"{num(float(p['flops_per_s']) / 1e12)} TFLOP/s, {num(float(p['bytes_per_s']) / 1e12)} TB/s"


def peak_text(p: Any) -> str:
    """"measured on NVIDIA H200: 760 TFLOP/s, 4.12 TB/s" or "nominal <gpu> peaks (not measured
    on the GPU): ..."; "not recorded" when there is nothing usable."""
    v = valid_peak(p)
    if v is None:
        return NOT_RECORDED
    gpu = str(v.get("gpu") or "an unnamed GPU")
    if v.get("measured"):
        return f"measured on {gpu}: {rates_text(v)} (bf16 GEMM, copy)"
    return f"nominal {gpu} peaks, not measured: {rates_text(v)}"


def peaks_summary(peaks: Iterable[Any], unrecorded: int = 0) -> str:
    """One sentence naming every distinct peak set in use (and how many floors record none)."""
    seen: dict[str, dict[str, Any]] = {}
    for p in peaks:
        v = valid_peak(p)
        if v is not None:
            seen.setdefault(peak_key(v), v)
    parts = [peak_text(v) for v in seen.values()]
    if unrecorded:
        parts.append(f"{unrecorded} floor{'s' if unrecorded > 1 else ''} with peaks {NOT_RECORDED}")
    return "; ".join(parts) if parts else NOT_RECORDED


def any_nominal(peaks: Iterable[Any]) -> bool:
    return any((v := valid_peak(p)) is not None and not v.get("measured") for p in peaks)


# ---------------------------------------------------------------- the roofline


@dataclass
class RoofPoint:
    shape: str  # shape label
    impl: str  # "tuned" or "default"
    flops: float
    nbytes: float
    ms: float

    @property
    def intensity(self) -> float:
        return self.flops / self.nbytes

    @property
    def flops_per_s(self) -> float:
        return self.flops / (self.ms * 1e-3)

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / (self.ms * 1e-3)


@dataclass
class Roofline:
    template: str
    points: list[RoofPoint] = field(default_factory=list)
    peaks: list[dict[str, Any]] = field(default_factory=list)  # distinct valid peaks of its floors
    skipped: list[str] = field(default_factory=list)  # shapes without a point, with why
    checks: list[str] = field(default_factory=list)  # recorded floors that disagree with cost / peaks


def cost_of(template: str, shape: Mapping[str, int], dtype: str) -> tuple[float, float] | str:
    """(FLOPs, bytes) of one call from the template's ``cost``, or why there is none."""
    try:
        import torch

        from momtune.kernels import get_template

        tdtype = getattr(torch, dtype, None)
        if not isinstance(tdtype, torch.dtype):
            return f"dtype {dtype!r} is not a torch dtype"
        flops, nbytes = get_template(template).cost(dict(shape), tdtype)
    except Exception as exc:  # noqa: BLE001 - an unknown template or shape: no point, said why
        return f"no cost ({type(exc).__name__}: {str(exc)[:80]})"
    if not (math.isfinite(flops) and math.isfinite(nbytes)) or flops <= 0 or nbytes <= 0:
        return f"cost ({flops:g} FLOPs, {nbytes:g} B) is not positive"
    return float(flops), float(nbytes)


def rooflines(a: Analysis, label: Any) -> dict[str, Roofline]:
    """Per template, the tuned and default points of every kernel shape with a known cost."""
    out: dict[str, Roofline] = {}
    for k in a.kernels:
        if k.tuned_ms is None and k.default_ms is None:
            continue
        roof = out.setdefault(k.sid.template, Roofline(k.sid.template))
        peak = valid_peak(k.floor_peak)
        if peak is not None and peak_key(peak) not in {peak_key(p) for p in roof.peaks}:
            roof.peaks.append(peak)
        shape = label(k.sid)
        cost = cost_of(k.sid.template, k.sid.shape_dict, k.sid.dtype)
        if isinstance(cost, str):
            roof.skipped.append(f"{shape}: {cost}")
            continue
        flops, nbytes = cost
        for impl, ms in (("tuned", k.tuned_ms), ("default", k.default_ms)):
            if ms is not None and ms > 0:
                roof.points.append(RoofPoint(shape, impl, flops, nbytes, ms))
        if peak is not None and k.floor_ms:
            floor = max(flops / float(peak["flops_per_s"]), nbytes / float(peak["bytes_per_s"])) * 1e3
            if abs(floor / k.floor_ms - 1) > 0.02:
                roof.checks.append(f"{shape}: the recorded floor is {num(k.floor_ms * 1e3)} µs, the template's "
                                   f"cost today with the same peaks gives {num(floor * 1e3)} µs (the cost "
                                   "model changed since the search)")
    return out
