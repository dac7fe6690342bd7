"""The correctness gate: poison outputs, compare them with the float64 reference, classify failures.

Every candidate runs on fresh random inputs with outputs preallocated and poisoned (floating
outputs NaN, integer outputs -1), so an element the kernel forgot to write shows up as a NaN /
-1 that the reference does not have. Errors: ``max_abs_err`` = max |out - ref|, and
``max_rel_err`` = max |out - ref| / max |ref| (relative to the output's scale, not elementwise,
so values near zero do not blow it up). An element passes when |out - ref| <= atol + rtol·|ref|.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

STATUSES = ("ok", "compile_error", "out_of_resources", "out_of_memory", "timeout", "illegal_memory",
            "wrong_answer", "invalid_config", "error")


@dataclass(frozen=True)
class Check:
    ok: bool
    max_abs_err: float
    max_rel_err: float
    reason: str = ""


def poison_(buffers: Mapping[str, torch.Tensor]) -> None:
    """Fill ``buffers`` in place with the poison: NaN (integers: -1, bools: True)."""
    for buf in buffers.values():
        if buf.is_floating_point() or buf.is_complex():
            buf.fill_(float("nan"))
        elif buf.dtype == torch.bool:
            buf.fill_(True)
        else:
            buf.fill_(-1)


def poison_like(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh buffers shaped like ``outputs``, filled with the poison (see :func:`poison_`)."""
    out = {key: torch.empty_like(t) for key, t in outputs.items()}
    poison_(out)
    return out


def compare(outputs: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
            atol: float, rtol: float) -> Check:
    """Compare every reference key; integer outputs must match exactly."""
    worst_abs = worst_rel = 0.0
    missing = [k for k in reference if k not in outputs]
    if missing:
        return Check(False, math.inf, math.inf, f"output {missing[0]!r} missing (launch returned {sorted(outputs)})")
    for key, ref in reference.items():
        out = outputs[key]
        if tuple(out.shape) != tuple(ref.shape):
            return Check(False, math.inf, math.inf,
                         f"output {key!r}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
        o = out.detach().to("cpu", torch.float64)
        r = ref.detach().to("cpu", torch.float64)
        bad_nan = torch.isnan(o) & ~torch.isnan(r)
        if bool(bad_nan.any()):
            where = tuple(int(i) for i in bad_nan.nonzero()[0])
            return Check(False, math.inf, math.inf,
                         f"output {key!r}: {int(bad_nan.sum())} NaN elements (unwritten or invalid), first at {where}")
        if o.numel() == 0:
            continue
        both = ~(torch.isnan(o) & torch.isnan(r))
        err = torch.where(both, (o - r).abs(), torch.zeros_like(o))
        scale = float(r[both].abs().max()) if bool(both.any()) else 0.0
        abs_err = float(err.max())
        rel_err = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else math.inf)
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
        exact = not (out.is_floating_point() or out.is_complex())
        bad = err > 0 if exact else err > atol + rtol * r.abs()
        if bool(bad.any()):
            i = int(torch.where(bad, err, torch.zeros_like(err)).argmax())
            where = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), err.shape))
            return Check(False, worst_abs, worst_rel,
                         f"output {key!r}: {int(bad.sum())}/{err.numel()} elements off, max abs err {abs_err:.3e} "
                         f"at {where} (out {o.flatten()[i].item():.6g}, ref {r.flatten()[i].item():.6g}); "
                         f"atol {atol:g} rtol {rtol:g}")
    return Check(True, worst_abs, worst_rel)


def first_line(exc: BaseException | str, limit: int = 300) -> str:
    """A short reason: the exception type and the first non-empty line of its message (for Triton's
    CompilationError, whose message starts with the source excerpt, its ``error_message``)."""
    text = exc if isinstance(exc, str) else (getattr(exc, "error_message", None) or str(exc))
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    if not isinstance(exc, str):
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line[:limit]


def classify(exc: BaseException) -> tuple[str, str]:
    """(status, reason) of an exception raised while compiling or running a candidate."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc)
    low = text.lower()
    modules = {cls.__module__ for cls in type(exc).__mro__}
    if "OutOfResources" in names or "out of resource" in low:
        return "out_of_resources", first_line(exc)
    if "illegal memory access" in low or "misaligned address" in low or "an illegal instruction" in low:
        return "illegal_memory", first_line(exc)
    if "CUDA error: out of memory" in text or isinstance(exc, torch.OutOfMemoryError):
        # the device's memory, not the kernel's per-block resources: other processes may hold it
        # (on the H200, session 11: 16 compile workers' cached blocks at N 196,608), so the search
        # retries it (momtune.study.RETRIED_ATTEMPTS) instead of ruling the config out
        return "out_of_memory", first_line(exc)
    compile_names = {"CompilationError", "CompileTimeAssertionFailure", "UnsupportedLanguageConstruct",
                     "PTXASError", "MLIRCompilationError"}
    if names & compile_names or any(m.startswith("triton.compiler") for m in modules):
        return "compile_error", first_line(exc)
    return "error", first_line(exc)


def is_kernel_resource_error(exc: BaseException) -> bool:
    """A launch that asked more of the GPU than it has per block (Triton's OutOfResources: shared
    memory; CUDA's too-many-resources): a smaller config may fit. Not device memory exhaustion."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    low = str(exc).lower()
    return "OutOfResources" in names or "out of resource" in low or "too many resources" in low


def is_fatal_for_process(status: str, reason: str) -> bool:
    """Whether the worker process must be restarted after this outcome (a broken CUDA context)."""
    return status in ("illegal_memory", "timeout") or "cuda error" in reason.lower()
