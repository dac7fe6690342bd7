"""The correctness gate of a candidate kernel: per-output bounds derived from the reference itself.

A correct kernel fed inputs in a low-precision dtype cannot be closer to the float64 reference
than the reference itself rounded to the precision the kernel computes and stores in. So the
bound on each floating output is a stated multiple (:data:`FACTOR`) of the error of the float64
reference rounded that way -- to the output's dtype, or, for float32 outputs of templates whose
``tl.dot`` runs in TF32 on a GPU, to TF32's 11-bit significand -- measured on the same inputs, in
two norms:

- **norm-wise**: ||out - ref|| / ||ref||, the error of the whole output (a 1% scale of every
  element is 1e-2 here, wherever the values are);
- **element-wise**: max |out - ref| / max |ref|, the worst element against the output's scale
  (a few elements far off).

Integer outputs must be exact. NaN where the reference has none is an unwritten (poisoned) or
invalid element. The gate checks the buffers the kernel wrote (poisoned before every run) on
the check run and again after timing, on other inputs copied into the same tensors (so a kernel
that caches its first answer, skips work after the first call or keeps a stale state fails),
through the same callable that was timed.

FACTOR: the templates' bf16 outputs on the H200 are 1.3-2.6x the output rounding's norm-wise error
at the mom-340m shapes (norm, swiglu, merge, conv, decode, recurrence; session-5 smoke against
the rounding computed on the CPU for the same shapes, see docs/PERFORMANCE.md), the reference
itself run in bf16 by PyTorch 1.5-3x; 4 leaves room for larger accumulations while a 1% scale
(1e-2 norm-wise against ~1.1e-3 x 4 in bf16) or a dropped chunk term fails.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

FACTOR = 4.0
#: a floor on every bound, per output dtype (a reference that rounds exactly, e.g. values that
#: are representable, must not make the bound 0): a quarter of the dtype's unit roundoff
FLOOR = {torch.bfloat16: 2.0 ** -10, torch.float16: 2.0 ** -13, torch.float32: 2.0 ** -26,
         torch.float64: 2.0 ** -55}
TF32_SIGNIFICAND = 11  # bits, the implicit one included (10 stored), as fp16's


def round_significand(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` (float64) rounded to ``bits`` significant bits, round-half-even, exponent unbounded."""
    m, e = torch.frexp(x)  # x = m 2^e, 0.5 <= |m| < 1
    scale = 2.0 ** bits
    return torch.ldexp(torch.round(m * scale) / scale, e)


def rounded(ref: torch.Tensor, dtype: torch.dtype, tf32: bool) -> torch.Tensor:
    """The float64 reference as a kernel computing in ``dtype`` (TF32 dots for float32 when
    ``tf32``) can at best hold it, back in float64."""
    r = ref.detach().to(torch.float64)
    if dtype == torch.float32 and tf32:
        return round_significand(r, TF32_SIGNIFICAND)
    return r.to(dtype).to(torch.float64)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(norm-wise, element-wise) relative errors of ``out`` from ``ref`` (float64, NaN-free)."""
    d = (out - ref).abs()
    rn, rm = float(torch.linalg.vector_norm(ref)), float(ref.abs().max()) if ref.numel() else 0.0
    dn, dm = float(torch.linalg.vector_norm(d)), float(d.max()) if d.numel() else 0.0
    return _ratio(dn, rn), _ratio(dm, rm)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


@dataclass(frozen=True)
class Bound:
    norm: float  # on ||out - ref|| / ||ref||
    elem: float  # on max |out - ref| / max |ref|
    source: str  # how it was derived


def holding_dtype(output: torch.dtype, kernel: torch.dtype) -> torch.dtype:
    """The precision a kernel run on ``kernel``-dtype inputs can hold an output of dtype ``output``
    in: the coarser of the two (a float32 state updated through fp16 tiles is fp16-accurate)."""
    if not kernel.is_floating_point:
        return output
    return output if torch.finfo(output).eps >= torch.finfo(kernel).eps else kernel


def derive_bounds(reference: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype], *,
                  kernel_dtype: torch.dtype | None = None, computed: Mapping[str, torch.Tensor] | None = None,
                  tf32: bool = False, factor: float = FACTOR) -> dict[str, Bound]:
    """Bounds per floating output: ``factor`` x the error from the float64 ``reference`` of
    ``computed`` (the same reference computed in float32, see :func:`reference_float32`; the
    float64 one if not given) rounded to what the kernel holds (:func:`holding_dtype` of the
    output's dtype in ``dtypes`` and ``kernel_dtype``; TF32's significand for float32 with
    ``tf32``), floored at FLOOR of that dtype."""
    out: dict[str, Bound] = {}
    for key, ref in reference.items():
        dt = dtypes.get(key, ref.dtype)
        if not (dt.is_floating_point or dt.is_complex):
            continue
        dt = holding_dtype(dt, kernel_dtype) if kernel_dtype is not None else dt
        r = ref.detach().to(torch.float64)  # on the reference's device (a GPU's float64 is fast)
        c = r if computed is None or key not in computed else computed[key].detach().to(r.device, torch.float64)
        ok = ~(torch.isnan(r) | torch.isnan(c))
        r, c = torch.where(ok, r, 0.0), torch.where(ok, c, 0.0)
        e_norm, e_elem = errors(rounded(c, dt, tf32), r)
        floor = FLOOR.get(dt, FLOOR[torch.float32])
        how = "TF32's significand" if dt == torch.float32 and tf32 else str(dt).replace("torch.", "")
        src = "float64 reference" if computed is None else "reference computed in float32"
        out[key] = Bound(factor * max(e_norm, floor), factor * max(e_elem, floor),
                         f"{factor:g} x the {src} rounded to {how}: {e_norm:.2e} norm-wise, {e_elem:.2e} "
                         "element-wise")
    return out


def reference_float32(template: Any, inputs: Mapping[str, Any], tf32: bool = False) -> dict[str, torch.Tensor] | None:
    """The template's reference computed in float32 (``reference(inputs, dtype=torch.float32)``;
    its matmuls in TF32 with ``tf32``), or None when its reference takes no dtype."""
    from .layer_check import tf32_matmuls

    try:
        params = inspect.signature(template.reference).parameters
    except (TypeError, ValueError):
        return None
    if "dtype" not in params:
        return None
    with tf32_matmuls(tf32):
        return template.reference(inputs, dtype=torch.float32)


def bounds_for(template: Any, inputs: Mapping[str, Any], reference: Mapping[str, torch.Tensor],
               outputs: Mapping[str, torch.Tensor], dtype: torch.dtype, device: str) -> dict[str, Bound]:
    """:func:`derive_bounds` for a template's trial: ``outputs`` give each output's dtype, TF32
    where the template declares ``tf32``, the kernels run on CUDA and their float32 dots run in
    TF32 (bf16/fp16 inputs; float32 inputs only where TF32 is chosen: :func:`momtune.settings.fp32_uses_tf32`)."""
    from .settings import fp32_uses_tf32

    tf32 = (bool(getattr(template, "tf32", False)) and str(device).startswith("cuda")
            and (dtype != torch.float32 or fp32_uses_tf32()))
    computed = reference_float32(template, inputs, tf32)
    return derive_bounds(reference, {k: v.dtype for k, v in outputs.items()}, kernel_dtype=dtype,
                         computed=computed, tf32=tf32)


KINDS = ("missing", "shape", "unwritten", "not_finite", "integer_mismatch", "norm", "elementwise")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    kind: str = ""  # one of KINDS when not ok
    reason: str = ""
    errors: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # output -> (norm, elem, abs)

    @property
    def worst(self) -> tuple[float, float, float]:
        """(norm-wise, element-wise, absolute) worst over the outputs checked."""
        return tuple(max((e[i] for e in self.errors.values()), default=0.0) for i in range(3))  # type: ignore[return-value]


def check(outputs: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
          bounds: Mapping[str, Bound], when: str = "check run") -> Verdict:
    """``outputs`` (the buffers the kernel wrote) against the float64 ``reference`` and ``bounds``."""
    errs: dict[str, tuple[float, float, float]] = {}
    for key, ref in reference.items():
        if key not in outputs:
            return Verdict(False, "missing", f"{when}: output {key!r} missing (got {sorted(outputs)})", errs)
        out = outputs[key]
        if tuple(out.shape) != tuple(ref.shape):
            return Verdict(False, "shape", f"{when}: output {key!r} shape {tuple(out.shape)} != {tuple(ref.shape)}", errs)
        # compared in float64 where the reference lives: on a GPU the comparison of a 134M-element
        # output takes milliseconds; copied to the CPU it took 8-21 s a trial (H200, session 9),
        # most of a large shape's search time
        dev = ref.device
        o = out.detach().to(dev, torch.float64)
        r = ref.detach().to(dev, torch.float64)
        if not (out.is_floating_point() or out.is_complex()):
            bad = o != r
            if bool(bad.any()):
                where = tuple(int(i) for i in bad.nonzero()[0])
                return Verdict(False, "integer_mismatch", f"{when}: output {key!r}: {int(bad.sum())}/{o.numel()} "
                               f"elements differ, first at {where} (got {int(o[where])}, want {int(r[where])})", errs)
            errs[key] = (0.0, 0.0, 0.0)
            continue
        unwritten = torch.isnan(o) & ~torch.isnan(r)
        if bool(unwritten.any()):
            where = tuple(int(i) for i in unwritten.nonzero()[0])
            return Verdict(False, "unwritten", f"{when}: output {key!r}: {int(unwritten.sum())}/{o.numel()} elements "
                           f"NaN (unwritten or invalid), first at {where}", errs)
        inf = torch.isinf(o) & ~torch.isinf(r)
        if bool(inf.any()):
            return Verdict(False, "not_finite", f"{when}: output {key!r}: {int(inf.sum())} infinite elements", errs)
        both = ~torch.isnan(r)
        o, r = torch.where(both, o, 0.0), torch.where(both, r, 0.0)
        e = errs[key] = (*errors(o, r), float((o - r).abs().max()) if o.numel() else 0.0)
        b = bounds.get(key)
        if b is None:
            continue
        if e[0] > b.norm:
            return Verdict(False, "norm", f"{when}: output {key!r}: norm-wise error {e[0]:.3e} > bound {b.norm:.3e} "
                           f"({b.source})", errs)
        if e[1] > b.elem:
            i = int((o - r).abs().argmax())
            where = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), o.shape))
            return Verdict(False, "elementwise", f"{when}: output {key!r}: max |out - ref| / max |ref| {e[1]:.3e} > "
                           f"bound {b.elem:.3e} at {where} (out {o.flatten()[i].item():.6g}, ref "
                           f"{r.flatten()[i].item():.6g}; {b.source})", errs)
    return Verdict(True, "", "", errs)
