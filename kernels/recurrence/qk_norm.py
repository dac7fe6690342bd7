"""The L2 normalisation of q and k (``use_qk_l2norm``) for the recurrence's backward, as two
Triton kernels over rows of the last axis (issue 14).

The chunk backward (:mod:`.chunk_bwd`) reads q, k normalised and scaled in float32 and returns
their gradients there; the inputs' gradients go back through ``y = scale * x / sqrt(sum(x^2) + eps)``:

    r  = 1 / sqrt(sum(x^2) + eps)            (per row, float32, kept by the forward)
    y  = scale * r * x
    dx = scale * r * (dy - u (u . dy)),  u = r x  (the unscaled normalised row)

Through autograd in PyTorch this was ~30 elementwise passes over float32 [N, H, K] tensors
(200 MB each at mom-340m B 8 T 2048): ~3 ms of a 23 ms layer training step on the H200 (session
12's profile). Here each direction is one pass: read x (and dy), write y (dx).

    y, r = l2norm_rows(x, scale)                # x [..., K] any float dtype; y float32, r [...] float32
    dx = l2norm_rows_backward(x, r, dy, scale)  # dx in x's dtype
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from momtune.errors import InputError

L2_EPS = 1e-6  # momtune.reference.recurrence.L2_EPS (checked by the tests)
NUM_WARPS = 8  # 16 elements of each row block a thread: 95-117 registers, no spills (sm_90, K = 256)


@triton.jit
def _l2norm_fwd_kernel(x_ptr, y_ptr, r_ptr, R, K, scale, eps, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) + eps)
    tl.store(y_ptr + offs, x * (r * scale)[:, None], mask=mask)
    tl.store(r_ptr + rows, r, mask=rows < R)


@triton.jit
def _l2norm_bwd_kernel(x_ptr, r_ptr, dy_ptr, dx_ptr, R, K, scale, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    r = tl.load(r_ptr + rows, mask=rows < R, other=0.0)
    u = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * r[:, None]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.sum(u * dy, axis=1)
    dx = (dy - u * c[:, None]) * (r * scale)[:, None]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(K: int) -> tuple[int, int]:
    bk = triton.next_power_of_2(max(K, 1))
    return max(1, 4096 // bk), bk  # ~4096 elements a program (16 rows at K = 256), 8 warps


def _rows(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise InputError(f"{name}: expected a floating-point tensor [..., K], got "
                         f"{type(x).__name__ if not isinstance(x, torch.Tensor) else (x.dtype, tuple(x.shape))}")
    return x.contiguous()


def l2norm_rows(x: torch.Tensor, scale: float = 1.0, eps: float = L2_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r): y = scale * x / sqrt(sum(x^2) + eps) over the last axis in float32 (x's shape), and
    r = 1 / sqrt(sum(x^2) + eps) in float32 (x's shape without the last axis), for
    :func:`l2norm_rows_backward`."""
    x = _rows("x", x)
    K = x.shape[-1]
    R = x.numel() // max(K, 1)
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    r = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if R and K:
        br, bk = _blocks(K)
        _l2norm_fwd_kernel[(triton.cdiv(R, br),)](x, y, r, R, K, float(scale), float(eps), BLOCK_R=br, BLOCK_K=bk,
                                                 num_warps=NUM_WARPS)
    return y, r


def l2norm_rows_backward(x: torch.Tensor, r: torch.Tensor, dy: torch.Tensor, scale: float = 1.0,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of x (x's dtype) given dy, the gradient of :func:`l2norm_rows`' y, and its r;
    written into ``out`` if given (contiguous, x's shape and dtype)."""
    x, dy = _rows("x", x), _rows("dy", dy)
    if dy.shape != x.shape:
        raise InputError(f"dy: expected x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if r.shape != x.shape[:-1] or r.dtype != torch.float32:
        raise InputError(f"r: expected float32 {tuple(x.shape[:-1])} (l2norm_rows' r), got {r.dtype} {tuple(r.shape)}")
    r = r.contiguous()
    K = x.shape[-1]
    R = x.numel() // max(K, 1)
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device
                            or not out.is_contiguous()):
        raise InputError(f"out: expected a contiguous {x.dtype} {tuple(x.shape)} on {x.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    dx = torch.empty_like(x) if out is None else out
    if R and K:
        br, bk = _blocks(K)
        _l2norm_bwd_kernel[(triton.cdiv(R, br),)](x, r, dy, dx, R, K, float(scale), BLOCK_R=br, BLOCK_K=bk,
                                                 num_warps=NUM_WARPS)
    return dx
