"""Backward of the weighted merge with the fused gated RMSNorm (issue 14).

Forward (kernels/merge/merge.py), per token t and head h over the V values:
    m = sum_j w[t, j] * o[slot[t, j], h, :]            (fp32)
    y = n * nw * silu(gate),  n = m * rstd,  rstd = rsqrt(mean(m^2) + eps)     (fused)
Given dy [B, T, H, V]:
    dgate = dy * n * nw * s * (1 + gate * (1 - s)),  s = sigmoid(gate)
    dnw   = sum over tokens and heads of dy * n * silu(gate)
    dm    = rstd * (dn - n * mean(dn * n)),  dn = dy * nw * silu(gate)      (dm = dy unfused)
    do[slot[t, j], h, :] = w[t, j] * dm
    dw[t, j] = sum over heads and V of dm * o[slot[t, j], h, :]
Nothing is saved but the forward's inputs: m, rstd and n are recomputed from o (J row reads, as
the forward). One program per (BLOCK_T tokens, head), the forward's layout; dw's per-head sums and
dnw's per-program sums go to fp32 workspaces added at the end. ``slot`` is the routing's layout: a
bijection onto the packed rows, so every row of ``do`` is written exactly once.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from momtune.checks import check_tensor
from momtune.kernels.merge.merge import checked_inputs
from momtune.kernels.routing.common import output_tensor, require_triton_device, resolve_config

DEFAULT_CONFIG: dict[str, int] = {"BLOCK_T": 8, "num_warps": 4}


@triton.jit
def _merge_bwd_kernel(
    o_ptr, slot_ptr, w_ptr, gate_ptr, nw_ptr, dy_ptr, do_ptr, dwh_ptr, dg_ptr, dnwp_ptr,
    BT, H, stride_on, stride_oh, stride_g, eps,
    V: tl.constexpr, J: tl.constexpr, FUSED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    h = pid % H
    t = (pid // H) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < BT
    v = tl.arange(0, BLOCK_V)
    if BLOCK_V == V:
        mask = tm[:, None]
    else:
        mask = tm[:, None] & (v[None, :] < V)
    t64 = t.to(tl.int64)
    dy = tl.load(dy_ptr + t64[:, None] * (H * V) + h * V + v[None, :], mask=mask, other=0.0).to(tl.float32)
    if FUSED:
        m = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        for j in tl.static_range(J):
            row = tl.load(slot_ptr + t * J + j, mask=tm, other=0).to(tl.int64)
            w = tl.load(w_ptr + t * J + j, mask=tm, other=0.0)
            o = tl.load(o_ptr + row[:, None] * stride_on + h * stride_oh + v[None, :], mask=mask, other=0.0)
            m += w[:, None] * o.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(m * m, 1) / V + eps)
        n = m * rstd[:, None]
        nw = tl.load(nw_ptr + v, mask=v < V, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + t64[:, None] * stride_g + h * V + v[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        silu = g * s
        dg = dy * n * nw[None, :] * s * (1.0 + g * (1.0 - s))
        tl.store(dg_ptr + t64[:, None] * (H * V) + h * V + v[None, :], dg.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(dnwp_ptr + pid.to(tl.int64) * V + v, tl.sum(dy * n * silu, 0), mask=v < V)
        dn = dy * nw[None, :] * silu
        c = tl.sum(dn * n, 1) / V
        dm = rstd[:, None] * (dn - n * c[:, None])
    else:
        dm = dy
    for j in tl.static_range(J):
        row = tl.load(slot_ptr + t * J + j, mask=tm, other=0).to(tl.int64)
        w = tl.load(w_ptr + t * J + j, mask=tm, other=0.0)
        optr = row[:, None] * stride_on + h * stride_oh + v[None, :]
        o = tl.load(o_ptr + optr, mask=mask, other=0.0).to(tl.float32)
        tl.store(dwh_ptr + (t64 * J + j) * H + h, tl.sum(dm * o, 1), mask=tm)
        tl.store(do_ptr + row[:, None] * (H * V) + h * V + v[None, :], (w[:, None] * dm).to(do_ptr.dtype.element_ty),
                 mask=mask)


def merge_backward(
    o_packed: torch.Tensor,
    slot: torch.Tensor,
    weights: torch.Tensor,
    dy: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    config: Mapping[str, Any] | None = None,
    out: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Gradients of :func:`momtune.kernels.merge.merge_prefill` from dy [B, T, H, V]:
    {"do_packed": [Np, H, V] in o_packed's dtype, "dweights": [B, T, J] float32} and, with the
    fused norm, "dgate": [B*T, H*V] in gate's dtype and "dnorm_weight": [V] in its dtype."""
    B, T, J, H, V, gate, norm_weight = checked_inputs(o_packed, slot, weights, gate, norm_weight, eps)
    Np, fused = B * T * J, gate is not None
    check_tensor("dy", dy, shape=(B, T, H, V), dtypes=(o_packed.dtype,))
    cfg = resolve_config(config, DEFAULT_CONFIG, "merge_bwd")
    require_triton_device(*([o_packed, slot, weights, dy] + ([gate, norm_weight] if fused else [])))
    dev = o_packed.device
    res = {"do_packed": output_tensor(out, "do_packed", (Np, H, V), o_packed.dtype, dev),
           "dweights": output_tensor(out, "dweights", (B, T, J), torch.float32, dev)}
    if fused:
        res["dgate"] = output_tensor(out, "dgate", (B * T, H * V), gate.dtype, dev)
        res["dnorm_weight"] = output_tensor(out, "dnorm_weight", (V,), norm_weight.dtype, dev)
    BT = B * T
    if BT == 0 or H == 0 or V == 0:
        res["dweights"].zero_()
        if fused:
            res["dnorm_weight"].zero_()
        return res
    if o_packed.stride(-1) != 1:
        o_packed = o_packed.contiguous()
    slot, weights, dy = slot.contiguous(), weights.contiguous(), dy.contiguous()
    programs = triton.cdiv(BT, cfg["BLOCK_T"]) * H
    dwh = torch.empty(BT, J, H, dtype=torch.float32, device=dev)
    dnwp = torch.empty(programs, V, dtype=torch.float32, device=dev) if fused else dwh
    _merge_bwd_kernel[(programs,)](
        o_packed, slot, weights, gate if fused else o_packed, norm_weight if fused else o_packed, dy,
        res["do_packed"], dwh, res["dgate"] if fused else dwh, dnwp,
        BT, H, o_packed.stride(0), o_packed.stride(1), gate.stride(0) if fused else 0, float(eps),
        V=V, J=J, FUSED=fused, BLOCK_T=cfg["BLOCK_T"], BLOCK_V=triton.next_power_of_2(V),
        num_warps=cfg["num_warps"],
    )
    res["dweights"].copy_(dwh.sum(2).view(B, T, J))
    if fused:
        res["dnorm_weight"].copy_(dnwp.sum(0))
    return res
