"""SwiGLU activation between the MLP's projections: y = silu(g) * u, fp32 inside, y in g's dtype.

g and u [N, I] are the outputs of gate_proj and up_proj (any row strides). One program per
(BLOCK_N rows, BLOCK_I columns). Memory-bound: reads 2 x N x I, writes N x I; replaces the
unfused silu and multiply (two launches and one N x I round trip).
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
def _swiglu_kernel(
    g_ptr, u_ptr, y_ptr, N, I, stride_g, stride_u,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < N)[:, None] & (cols < I)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(g_ptr + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + r64 * I + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def swiglu(
    g: torch.Tensor,
    u: torch.Tensor,
    *,
    config: Mapping[str, Any] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """g, u [N, I] (last dim contiguous) -> silu(g) * u [N, I] in g's dtype."""
    check_tensor("g", g, ndim=2, dtypes=DTYPES)
    N, I = g.shape
    check_tensor("u", u, shape=(N, I), dtypes=(g.dtype,))
    for name, t in (("g", g), ("u", u)):
        if I and t.stride(-1) != 1:
            raise InputError(f"{name}: the last dimension must be contiguous, got strides {tuple(t.stride())}")
    cfg = resolve_config(config, DEFAULT_CONFIG, "swiglu")
    require_triton_device(g, u)
    y = output_tensor(out, "y", (N, I), g.dtype, g.device)
    if N and I:
        BN, BI = cfg["BLOCK_N"], cfg["BLOCK_I"]
        _swiglu_kernel[(triton.cdiv(N, BN), triton.cdiv(I, BI))](
            g, u, y, N, I, g.stride(0), u.stride(0), BLOCK_N=BN, BLOCK_I=BI, num_warps=cfg["num_warps"],
        )
    return y
