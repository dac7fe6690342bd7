"""RMSNorm of a row, optionally of the residual sum: one read of x (and the residual), one or two
writes.

    h = x + residual   (rounded to x's dtype, as the unfused block's bf16 add)   [with residual]
    y = h * rsqrt(mean(h^2) + eps) * weight   (fp32 inside, y in x's dtype)

One program per BLOCK_N rows; a row of D values is one tile (BLOCK_D = next power of two >= D).
In the LM block this is attn_norm (no residual) and mlp_norm after the attention's residual add
(h is the new residual stream): memory-bound, ~2 (3 with residual) x N x D elements moved.
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

DEFAULT_CONFIG: dict[str, int] = {"BLOCK_N": 1, "num_warps": 4}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, h_ptr,
    N, D, stride_x, stride_r, eps,
    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    # EVEN_D (BLOCK_D == D, decided on the host) is a constexpr so that only one branch is compiled:
    # a test of the runtime D would compile both, and their masks' types differ.
    if EVEN_D:
        mask = (rows < N)[:, None]  # constant along a row: keeps the loads vectorised
    else:
        mask = (rows < N)[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        res = tl.load(r_ptr + r64 * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + r64 * D + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = xf * rstd[:, None] * w[None, :]
    tl.store(y_ptr + r64 * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    eps: float = 1e-6,
    config: Mapping[str, Any] | None = None,
    out: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] (rows may be strided; last dim contiguous), weight [D] -> (y, h) [N, D] in x's dtype.

    With ``residual`` [N, D]: h = x + residual and y = rms_norm(h) * weight; without: h is x
    itself and y = rms_norm(x) * weight. ``out`` (optional) holds preallocated ``y``/``h``.
    """
    check_tensor("x", x, ndim=2, dtypes=DTYPES)
    N, D = x.shape
    check_tensor("weight", weight, shape=(D,), dtypes=DTYPES)
    if residual is not None:
        check_tensor("residual", residual, shape=(N, D), dtypes=(x.dtype,))
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and D and t.stride(-1) != 1:
            raise InputError(f"{name}: the last dimension must be contiguous, got strides {tuple(t.stride())}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise InputError(f"eps: expected a number > 0, got {eps!r}")
    cfg = resolve_config(config, DEFAULT_CONFIG, "norm")
    require_triton_device(*(t for t in (x, weight, residual) if t is not None))
    y = output_tensor(out, "y", (N, D), x.dtype, x.device)
    h = x if residual is None else output_tensor(out, "h", (N, D), x.dtype, x.device)
    if N and D:
        BN = cfg["BLOCK_N"]
        _rms_norm_kernel[(triton.cdiv(N, BN),)](
            x, x if residual is None else residual, weight.contiguous(), y, h,
            N, D, x.stride(0), x.stride(0) if residual is None else residual.stride(0), float(eps),
            HAS_RES=residual is not None, BLOCK_N=BN, BLOCK_D=triton.next_power_of_2(D),
            EVEN_D=triton.next_power_of_2(D) == D,
            num_warps=cfg["num_warps"],
        )
    return y, h
