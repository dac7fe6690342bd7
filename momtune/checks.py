"""Argument checks shared by the reference, the kernels and the engine.

Each check raises :class:`momtune.errors.InputError` naming the argument, what it got and
what is accepted.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .errors import InputError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    x: object,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    finite: bool = False,
) -> torch.Tensor:
    """Check that ``x`` is a tensor of the given rank, shape (None = any) and dtype."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise InputError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")
    if shape is not None:
        if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise InputError(f"{name}: expected shape {want}, got {list(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise InputError(f"{name}: dtype {str(x.dtype).replace('torch.', '')} not accepted; use one of {names}")
    if finite and x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        raise InputError(f"{name}: contains NaN or inf; inputs must be finite")
    return x


def check_int(name: str, value: object, *, lo: int | None = None, hi: int | None = None) -> int:
    """Check an integer argument lies in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name}: expected an int, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise InputError(f"{name}: {value} is outside the accepted range {rng}")
    return value


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    if value not in choices:
        raise InputError(f"{name}: {value!r} is not accepted; choose one of {', '.join(map(repr, choices))}")
    return value


def check_cu_seqlens(name: str, cu: object, total: int) -> torch.Tensor:
    """cu_seqlens: 1-D integer tensor, starts at 0, non-decreasing, ends at ``total``."""
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32, torch.int64))
    assert isinstance(cu, torch.Tensor)
    if cu.numel() < 2:
        raise InputError(f"{name}: needs at least 2 entries (one segment), got {cu.numel()}")
    c = cu.detach().cpu()
    if int(c[0]) != 0 or int(c[-1]) != total or bool((c[1:] < c[:-1]).any()):
        raise InputError(
            f"{name}: must start at 0, be non-decreasing and end at the token count {total}; "
            f"got {c.tolist()[:8]}{'...' if c.numel() > 8 else ''}"
        )
    return cu
