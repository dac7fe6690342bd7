"""Backward of RMSNorm (with the residual add) (issue 14): the gradients of h and of the weight.

Forward (kernels/norm/norm.py): h = x + residual (or h = x), y = n * w with n = h * rstd,
rstd = rsqrt(mean(h^2) + eps). Given dy and, when h is also the block's residual stream, the
gradient dh_out flowing back into it:

    dn = dy * w
    dh = rstd * (dn - n * mean(dn * n)) + dh_out      (x and the residual both get dh)
    dw = sum over rows of dy * n

Saved by the forward: h only (rstd and n are recomputed: one read of h instead of storing n).
fp32 inside; dh in h's dtype, dw in the weight's dtype. One program per ROWS rows, BLOCK_N rows
at a time, each keeping its partial dw in registers; the partial sums ([programs, D] fp32) are
added by a second small reduction (torch.sum over programs). Memory-bound: reads h, dy (and
dh_out), writes dh.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from momtune.checks import check_tensor
from momtune.errors import ConfigError, InputError
from momtune.kernels.routing.common import output_tensor, require_triton_device, resolve_config

DEFAULT_CONFIG: dict[str, int] = {"BLOCK_N": 1, "ROWS": 64, "num_warps": 4}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rms_norm_bwd_kernel(
    h_ptr, w_ptr, dy_ptr, dho_ptr, dh_ptr, dwp_ptr,
    N, D, stride_h, stride_dy, stride_dho, eps,
    HAS_DHO: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_N):
        rows = pid * ROWS + start + tl.arange(0, BLOCK_N)
        # EVEN_D is a constexpr (decided on the host) so that only one mask type is compiled
        if EVEN_D:
            mask = (rows < N)[:, None]
        else:
            mask = (rows < N)[:, None] & (cols < D)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        h = tl.load(h_ptr + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, 1) / D + eps)
        n = h * rstd[:, None]
        dn = dy * w[None, :]
        c = tl.sum(dn * n, 1) / D
        dh = rstd[:, None] * (dn - n * c[:, None])
        if HAS_DHO:
            dh += tl.load(dho_ptr + r64 * stride_dho + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dh_ptr + r64 * D + cols[None, :], dh.to(dh_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * n, 0)  # rows past N load 0: they add nothing
    tl.store(dwp_ptr + pid.to(tl.int64) * D + cols, dw, mask=cols < D)


def rms_norm_backward(
    h: torch.Tensor,
    weight: torch.Tensor,
    dy: torch.Tensor,
    *,
    dh_out: torch.Tensor | None = None,
    eps: float = 1e-6,
    config: Mapping[str, Any] | None = None,
    out: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, D] (the forward's normalised input, x + residual), weight [D], dy [N, D] and
    optionally dh_out [N, D] (the gradient of h as the residual stream) -> (dh [N, D] in h's
    dtype, dw [D] in the weight's dtype). Rows may be strided; the last dims contiguous."""
    check_tensor("h", h, ndim=2, dtypes=DTYPES)
    N, D = h.shape
    check_tensor("weight", weight, shape=(D,), dtypes=DTYPES)
    check_tensor("dy", dy, shape=(N, D), dtypes=(h.dtype,))
    if dh_out is not None:
        check_tensor("dh_out", dh_out, shape=(N, D), dtypes=(h.dtype,))
    for name, t in (("h", h), ("dy", dy), ("dh_out", dh_out)):
        if t is not None and D and t.stride(-1) != 1:
            raise InputError(f"{name}: the last dimension must be contiguous, got strides {tuple(t.stride())}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise InputError(f"eps: expected a number > 0, got {eps!r}")
    cfg = resolve_config(config, DEFAULT_CONFIG, "norm_bwd")
    if cfg["ROWS"] % cfg["BLOCK_N"]:
        raise ConfigError(f"norm_bwd config: ROWS ({cfg['ROWS']}) must be a multiple of BLOCK_N ({cfg['BLOCK_N']})")
    require_triton_device(*(t for t in (h, weight, dy, dh_out) if t is not None))
    dh = output_tensor(out, "dh", (N, D), h.dtype, h.device)
    dw = output_tensor(out, "dw", (D,), weight.dtype, h.device)
    if not N or not D:
        dw.zero_()
        return dh, dw
    programs = triton.cdiv(N, cfg["ROWS"])
    partial = torch.empty(programs, D, dtype=torch.float32, device=h.device)
    _rms_norm_bwd_kernel[(programs,)](
        h, weight.contiguous(), dy, dy if dh_out is None else dh_out, dh, partial,
        N, D, h.stride(0), dy.stride(0), dy.stride(0) if dh_out is None else dh_out.stride(0), float(eps),
        HAS_DHO=dh_out is not None, ROWS=cfg["ROWS"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=triton.next_power_of_2(D),
        EVEN_D=triton.next_power_of_2(D) == D, num_warps=cfg["num_warps"],
    )
    dw.copy_(partial.sum(0))  # fp32 sum of the programs' partial sums, then the weight's dtype
    return dh, dw
