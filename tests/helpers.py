"""Shared test helpers: one assert that says how far off and where."""
from __future__ import annotations

import torch


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    """Fail with max abs / rel error and the worst index if out is not within atol + rtol*|ref|."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    nan = torch.isnan(o) & ~torch.isnan(r)
    if bool(nan.any()):
        where = tuple(int(i) for i in nan.nonzero()[0])
        raise AssertionError(f"{name}: {int(nan.sum())} NaN elements (unwritten or invalid), first at {where}")
    err = (o - r).abs()
    bad = err > atol + rtol * r.abs()
    if bool(bad.any()):
        i = int(err.argmax())
        where = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), err.shape))
        rel = (err / r.abs().clamp_min(1e-30)).flatten()[i].item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements off; max abs err {err.max().item():.3e} "
            f"at {where} (out {o.flatten()[i].item():.6g}, ref {r.flatten()[i].item():.6g}, rel {rel:.3e}); "
            f"atol {atol:g} rtol {rtol:g}"
        )


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN (integer tensors with -1) in place and return it."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)
