"""Weighted merge of the packed per-memory read-outs back to tokens, with the output gated
RMSNorm fused in.

One program per (BLOCK_T tokens, head): for each of the J slots it gathers the rows
``o_packed[slot[t, j], h, :]`` (contiguous V-vectors), accumulates ``weights[t, j] * row`` in
fp32, then optionally applies ``rms_norm(y) * norm_weight * silu(gate)`` over the head's V
values, and stores once in o_packed's dtype. Memory-bound: J reads of each output element's
row, one gate read, one write.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from momtune.checks import check_tensor
from momtune.errors import InputError
from momtune.kernels.routing.common import FLOAT_DTYPES, INDEX_DTYPES, output_tensor, require_triton_device, resolve_config

DEFAULT_CONFIG: dict[str, int] = {"BLOCK_T": 8, "num_warps": 4}


@triton.jit
def _merge_kernel(
    o_ptr, slot_ptr, w_ptr, gate_ptr, nw_ptr, y_ptr,
    BT, H, stride_on, stride_oh, stride_g, eps,
    V: tl.constexpr, J: tl.constexpr, FUSED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    h = pid % H  # heads of the same tokens in neighbouring programs
    t = (pid // H) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < BT
    v = tl.arange(0, BLOCK_V)
    if BLOCK_V == V:
        mask = tm[:, None]  # broadcast along V: constant per row, keeps loads vectorised
    else:
        mask = tm[:, None] & (v[None, :] < V)
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for j in tl.static_range(J):
        row = tl.load(slot_ptr + t * J + j, mask=tm, other=0).to(tl.int64)
        w = tl.load(w_ptr + t * J + j, mask=tm, other=0.0)
        o = tl.load(o_ptr + row[:, None] * stride_on + h * stride_oh + v[None, :], mask=mask, other=0.0)
        acc += w[:, None] * o.to(tl.float32)
    t64 = t.to(tl.int64)
    if FUSED:
        rstd = tl.rsqrt(tl.sum(acc * acc, 1) / V + eps)
        nw = tl.load(nw_ptr + v, mask=v < V, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + t64[:, None] * stride_g + h * V + v[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = acc * rstd[:, None] * nw[None, :] * (g * tl.sigmoid(g))
    tl.store(y_ptr + t64[:, None] * (H * V) + h * V + v[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def checked_inputs(o_packed: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor | None,
                   norm_weight: torch.Tensor | None, eps: float) -> tuple[Any, ...]:
    """The merge's inputs checked, naming the argument at fault (forward and backward):
    (B, T, J, H, V, gate as [B*T, H*V] with contiguous rows or None, norm_weight contiguous or None)."""
    check_tensor("o_packed", o_packed, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("slot", slot, ndim=3, dtypes=INDEX_DTYPES)
    B, T, J = slot.shape
    Np, H, V = o_packed.shape
    if Np != B * T * J:
        raise InputError(f"o_packed: expected {B * T * J} packed rows (B*T*J from slot {list(slot.shape)}), got {Np}")
    check_tensor("weights", weights, shape=(B, T, J), dtypes=(torch.float32,))
    fused = gate is not None
    if fused != (norm_weight is not None):
        raise InputError("gate / norm_weight: give both (fused gated RMSNorm) or neither")
    if fused:
        assert gate is not None and norm_weight is not None
        if gate.dim() == 3:
            check_tensor("gate", gate, shape=(B, T, H * V), dtypes=FLOAT_DTYPES)
        else:
            check_tensor("gate", gate, shape=(B * T, H * V), dtypes=FLOAT_DTYPES)
        gate = gate.reshape(B * T, H * V)
        if gate.stride(-1) != 1:
            gate = gate.contiguous()
        check_tensor("norm_weight", norm_weight, shape=(V,), dtypes=FLOAT_DTYPES)
        norm_weight = norm_weight.contiguous()
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise InputError(f"eps: expected a positive float, got {eps!r}")
    return B, T, J, H, V, gate, norm_weight


def merge_prefill(
    o_packed: torch.Tensor,
    slot: torch.Tensor,
    weights: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    config: Mapping[str, Any] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[b, t] = sum_j weights[b, t, j] * o_packed[slot[b, t, j]] (fp32 accumulation).

    o_packed [Np, H, V] (Np = B*T*J), slot [B, T, J] int32/int64, weights [B, T, J] float32.
    With ``gate`` ([B*T, H*V] or [B, T, H*V]) and ``norm_weight`` [V]: per-head
    ``rms_norm(y) * norm_weight * silu(gate)`` fused (fp32 math). Returns y [B, T, H, V] in
    o_packed's dtype (written into ``out`` if given).
    """
    B, T, J, H, V, gate, norm_weight = checked_inputs(o_packed, slot, weights, gate, norm_weight, eps)
    fused = gate is not None
    cfg = resolve_config(config, DEFAULT_CONFIG, "merge")
    tensors = [o_packed, slot, weights] + ([gate, norm_weight] if fused else [])
    require_triton_device(*tensors)
    y = output_tensor(out, "out", (B, T, H, V), o_packed.dtype, o_packed.device)
    if o_packed.stride(-1) != 1:
        o_packed = o_packed.contiguous()
    slot, weights = slot.contiguous(), weights.contiguous()
    BT = B * T
    if BT == 0 or H == 0 or V == 0:
        return y
    grid = (triton.cdiv(BT, cfg["BLOCK_T"]) * H,)
    _merge_kernel[grid](
        o_packed, slot, weights, gate if fused else o_packed, norm_weight if fused else o_packed, y,
        BT, H, o_packed.stride(0), o_packed.stride(1), gate.stride(0) if fused else 0, float(eps),
        V=V, J=J, FUSED=fused, BLOCK_T=cfg["BLOCK_T"], BLOCK_V=triton.next_power_of_2(V),
        num_warps=cfg["num_warps"],
    )
    return y
