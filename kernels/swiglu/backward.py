"""Backward of the SwiGLU activation y = silu(g) * u (issue 14): dg and du from dy, g and u.

    s  = sigmoid(g)
    du = dy * g * s
    dg = dy * u * s * (1 + g * (1 - s))

fp32 inside, dg and du in g's dtype. Nothing is saved by the forward but its inputs g and u
(silu(g) is recomputed: one N x I read less than storing it and reading it back). One program per
(BLOCK_N rows, BLOCK_I columns). Memory-bound: reads 3 x N x I, writes 2 x N x I.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from momtune.checks import check_tensor
from momtune.errors import InputError
from momtune.kernels.routing.common import output_tensor, require_triton_device, resolve_config

DEFAULT_CONFIG: dict[str, int] = {"BLOCK_N": 4, "BLOCK_I": 512, "num_warps": 4}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _swiglu_bwd_kernel(
    g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, N, I, stride_g, stride_u, stride_dy,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < N)[:, None] & (cols < I)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(g_ptr + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    du = dy * g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dg_ptr + r64 * I + cols[None, :], dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + r64 * I + cols[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)


def swiglu_backward(
    g: torch.Tensor,
    u: torch.Tensor,
    dy: torch.Tensor,
    *,
    config: Mapping[str, Any] | None = None,
    out: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """g, u, dy [N, I] (last dim contiguous, one dtype) -> (dg, du) [N, I] in g's dtype.
    ``out`` (optional) holds preallocated ``dg``/``du``."""
    check_tensor("g", g, ndim=2, dtypes=DTYPES)
    N, I = g.shape
    check_tensor("u", u, shape=(N, I), dtypes=(g.dtype,))
    check_tensor("dy", dy, shape=(N, I), dtypes=(g.dtype,))
    for name, t in (("g", g), ("u", u), ("dy", dy)):
        if I and t.stride(-1) != 1:
            raise InputError(f"{name}: the last dimension must be contiguous, got strides {tuple(t.stride())}")
    cfg = resolve_config(config, DEFAULT_CONFIG, "swiglu_bwd")
    require_triton_device(g, u, dy)
    dg = output_tensor(out, "dg", (N, I), g.dtype, g.device)
    du = output_tensor(out, "du", (N, I), g.dtype, g.device)
    if N and I:
        BN, BI = cfg["BLOCK_N"], cfg["BLOCK_I"]
        _swiglu_bwd_kernel[(triton.cdiv(N, BN), triton.cdiv(I, BI))](
            g, u, dy, dg, du, N, I, g.stride(0), u.stride(0), dy.stride(0), BLOCK_N=BN, BLOCK_I=BI,
            num_warps=cfg["num_warps"],
        )
    return dg, du
