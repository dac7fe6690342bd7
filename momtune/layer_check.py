"""How far a fast MoM layer is from the float64 reference, and how far it may be.

Top-k routing is discrete: a token whose two best memories are nearly tied in float64 can pick the
other one when its router logits come from a bf16 GEMM, and its output (and, through the memory's
state, later outputs) changes by O(1). Such flips are a property of the dtype, not of a kernel:
the PyTorch reference itself, run in bf16, is 0.07-0.12 away from float64 at the mom-340m layer
shape for that reason, and 0.0065 away once its routing is pinned. So a layer is checked in two
parts:

- **numerics**: the float64 reference is run with its router logits pinned to the fast layer's
  own (the same memories for every token), against the fast output. The bound is a stated multiple
  of the error of the reference itself run in the fast layer's dtype (bf16 inputs, weights and
  rounding; TF32 matmuls where the kernels use TF32), pinned the same way;
- **routing**: the fast layer's router logits are at most the stated multiple of the
  dtype-rounded reference router's largest error from float64, or of float32 accumulation's error
  in a length-D dot product where that is larger (float32 layers: another summation order). With every logit within e of
  float64, a token can take other memories than float64's only where float64's last memory
  taken and first left out are within 2e: a tie at the dtype's resolution. Such tokens are
  counted, not failed.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

FACTOR = 2.0  # a correct kernel is at most this many times the dtype-rounded reference's error
# float32 layers: the kernels run every tl.dot in TF32 (the chunk's W/U transform and its solve, q.k,
# the state pass), the reference only its cuBLAS matmuls, so a correct kernel sits at a larger
# multiple of the TF32 reference's error: 2.23x on the H200 at the mom-340m layer shape
# (1.79e-3 vs 8.0e-4, 2026-11-28). IEEE float32 dots (issue 12) would remove this allowance.
TF32_FACTOR = 3.0


@dataclass
class LayerCheck:
    rel_err: float        # ||out - ref|| / ||ref||, routing pinned to the fast layer's
    ref_rel_err: float    # the same for the reference run in the fast layer's dtype
    bound: float          # FACTOR (TF32_FACTOR with TF32 dots) * ref_rel_err
    logit_err: float      # max |fast logits - float64 logits| over real tokens
    logit_bound: float    # FACTOR * the same for the reference's router in the layer's dtype (or float32 dot error)
    flips: int            # tokens routed to another set of memories than float64's (ties)
    tokens: int
    free_rel_err: float   # against the float64 reference routing on its own logits (informative)

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.bound and self.logit_err <= self.logit_bound

    def describe(self) -> str:
        return (f"rel err {self.rel_err:.3e} (bound {self.bound:.3e} = {self.bound / max(self.ref_rel_err, 1e-300):.3g} x "
                f"the {self.ref_rel_err:.3e} of the "
                f"reference in the layer's dtype, routing pinned); router logits max err {self.logit_err:.2e} "
                f"(bound {self.logit_bound:.2e}); {self.flips}/{self.tokens} tokens routed otherwise than float64 "
                f"(ties); unpinned rel err {self.free_rel_err:.3e}")


@contextlib.contextmanager
def tf32_matmuls(on: bool) -> Iterator[None]:
    """TF32 for PyTorch's CUDA matmuls (and cuDNN) on or off within the block: the dtype-rounded
    reference of float32 kernels, whose dots run in TF32, runs its matmuls in TF32 too."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def pinned_router(layer: torch.nn.Module, logits: torch.Tensor,
                  cu_seqlens: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, ``layer.gate(x)`` returns ``logits`` [N, E] (reshaped to x's leading
    dims, in x's dtype) instead of computing them. With ``cu_seqlens`` (packed sequences, which the
    reference runs as rows [S, max length] padded at the end) the logits are laid out that way."""
    gate = layer.gate
    if cu_seqlens is not None:
        cu = cu_seqlens.to(logits.device, torch.int64)
        rows = torch.arange(logits.shape[0], device=logits.device)
        seq = torch.searchsorted(cu[1:], rows, right=True)
        pos = rows - cu[seq]
        padded = logits.new_zeros(cu.numel() - 1, max(1, int((cu[1:] - cu[:-1]).max())), logits.shape[-1])
        padded[seq, pos] = logits
        logits = padded

    def forward(x: torch.Tensor) -> torch.Tensor:
        return logits.reshape(*x.shape[:-1], logits.shape[-1]).to(x.dtype)

    gate.forward = forward
    try:
        yield
    finally:
        del gate.forward


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _valid_rows(kwargs: dict[str, Any], n: int, device: torch.device) -> torch.Tensor:
    mask = kwargs.get("attention_mask")
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return (mask[:, -(n // mask.shape[0]):] != 0).reshape(-1)


def _dot_error(ref64: torch.nn.Module, x: torch.Tensor, valid: torch.Tensor) -> float:
    """The error a router GEMM accumulating in float32 may have on its largest logit in any
    summation order, by the probabilistic model of a length-D dot product (Higham and Mary 2019:
    |error| <= sqrt(D) u |x|.|w| with u float32's unit roundoff, holding with high probability): the
    dtype reference's router is a GEMM with E columns, which cuBLAS sums in another order than the
    fast layer's fused projection (their float32 errors were 3.8e-7 / 1.0e-6 on the H200, both right).
    Far below a bf16 router's own rounding; it matters for float32 layers."""
    w = getattr(getattr(ref64, "gate", None), "weight", None)
    if w is None:
        return 0.0
    x2 = x.detach().reshape(-1, x.shape[-1]).double()[valid]
    scale = x2.abs() @ w.detach().double().abs().t().to(x2.device)
    return float(scale.max()) * x.shape[-1] ** 0.5 * 2.0 ** -24 if scale.numel() else 0.0


def check_layer(fast: torch.nn.Module, ref64: torch.nn.Module, x: torch.Tensor, *,
                tf32: bool | None = None, **kwargs: Any) -> LayerCheck:
    """Run ``fast`` on ``x`` (its dtype is the layer's) and compare with ``ref64`` (the reference
    layer in float64 with the same weights) as the module docstring says. ``kwargs`` go to both
    forwards (attention_mask, cu_seqlens). ``tf32``: the kernels' float32 dots run in TF32 (for
    float32 inputs on CUDA where torch allows TF32 matmuls, as the kernels then do), so the
    dtype-rounded reference runs its matmuls in TF32 too."""
    dtype = x.dtype
    if tf32 is None:  # the interpreter has no TF32
        from .settings import fp32_uses_tf32

        tf32 = dtype == torch.float32 and x.is_cuda and fp32_uses_tf32()
    with torch.no_grad():
        out, logits = fast(x, **kwargs)[:2]
        free, logits64 = ref64(x.double(), **kwargs)[:2]
        cu = kwargs.get("cu_seqlens")
        with pinned_router(ref64, logits.double(), cu):
            want = ref64(x.double(), **kwargs)[0]
        ref_dt = copy.deepcopy(ref64).to(dtype)
        with tf32_matmuls(tf32):
            base_logits = ref_dt(x, **kwargs)[1]
            with pinned_router(ref_dt, logits, cu):
                base = ref_dt(x, **kwargs)[0]
    k = int(getattr(ref64, "topk"))
    lg, lg64 = logits.double().reshape(-1, logits.shape[-1]), logits64.double().reshape(-1, logits.shape[-1])
    valid = _valid_rows(kwargs, lg.shape[0], lg.device)
    lg, lg64 = lg[valid], lg64[valid]
    lgb = base_logits.double().reshape(-1, logits.shape[-1])[valid]
    logit_err = float((lg - lg64).abs().max()) if lg.numel() else 0.0
    logit_bound = FACTOR * max(float((lgb - lg64).abs().max()), _dot_error(ref64, x, valid)) if lg.numel() else 0.0
    mine = torch.zeros_like(lg, dtype=torch.bool).scatter_(1, lg.topk(k, -1).indices, True)
    theirs = torch.zeros_like(lg, dtype=torch.bool).scatter_(1, lg64.topk(k, -1).indices, True)
    flipped = (mine != theirs).any(-1)
    ref_err = _rel(base, want)
    factor = TF32_FACTOR if tf32 else FACTOR
    return LayerCheck(_rel(out, want), ref_err, factor * ref_err, logit_err, logit_bound, int(flipped.sum()),
                      int(valid.sum()), _rel(out, free))
