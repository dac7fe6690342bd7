"""Backward of the router's weights (issue 14): d logits from d weights through the renormalised
top-k softmax. The memory indices are not differentiable (as in fla).

Forward (kernels/routing/routing.py): p = softmax(logits) over E, the top-k of p renormalised:
w_j = p[idx_j] / sum_k p[idx_k], which is the softmax over the k chosen logits (the full softmax's
normaliser cancels). So only the chosen logits get a gradient:
    dlogits[idx_j] = w_j * (dw_j - sum_k w_k dw_k),   every other logit 0.
The shared slot's weight is the constant 1 (its dw is ignored); a padding token (idx -1) gets 0.
The weights are the forward's own (saved: [B, T, J] fp32, which the merge needs anyway), so
nothing is exponentiated again. The load-balancing loss differentiates the returned router
logits itself (PyTorch). One program per BLOCK_T tokens, a token's E logits in one tile; fp32
inside, dlogits in the requested dtype (the logits').
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from momtune.checks import check_int, check_tensor
from momtune.errors import InputError
from momtune.kernels.routing.common import FLOAT_DTYPES, INDEX_DTYPES, output_tensor, require_triton_device, resolve_config

DEFAULT_CONFIG: dict[str, int] = {"BLOCK_T": 64, "num_warps": 4}


@triton.jit
def _route_weights_bwd_kernel(
    w_ptr, idx_ptr, dw_ptr, dl_ptr, BT, E, J,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < BT
    e = tl.arange(0, BLOCK_E)
    t64 = t.to(tl.int64)
    wdw = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(K):
        i = tl.load(idx_ptr + t64 * J + j, mask=tm, other=-1)
        wj = tl.load(w_ptr + t64 * J + j, mask=tm & (i >= 0), other=0.0).to(tl.float32)
        wdw += wj * tl.load(dw_ptr + t64 * J + j, mask=tm, other=0.0).to(tl.float32)
    dl = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for j in tl.static_range(K):
        i = tl.load(idx_ptr + t64 * J + j, mask=tm, other=-1)
        wj = tl.load(w_ptr + t64 * J + j, mask=tm & (i >= 0), other=0.0).to(tl.float32)
        dwj = tl.load(dw_ptr + t64 * J + j, mask=tm, other=0.0).to(tl.float32)
        dl += tl.where(e[None, :] == i[:, None], (wj * (dwj - wdw))[:, None], 0.0)
    tl.store(dl_ptr + t64[:, None] * E + e[None, :], dl.to(dl_ptr.dtype.element_ty), mask=tm[:, None] & (e < E)[None, :])


def route_weights_backward(
    weights: torch.Tensor,
    idx: torch.Tensor,
    dweights: torch.Tensor,
    topk: int,
    num_memories: int,
    *,
    dtype: torch.dtype = torch.float32,
    config: Mapping[str, Any] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """weights, idx, dweights [B, T, J] (the routing's weights and memory of each slot: the top-k
    first, then the shared slot if any; idx -1 on padding) -> dlogits [B, T, num_memories] in
    ``dtype`` (only the first ``topk`` slots carry a gradient)."""
    check_tensor("weights", weights, ndim=3, dtypes=(torch.float32,))
    B, T, J = weights.shape
    check_int("num_memories", num_memories, lo=1)
    check_int("topk", topk, lo=1, hi=min(num_memories, max(J, 1)))
    check_tensor("idx", idx, shape=(B, T, J), dtypes=INDEX_DTYPES)
    check_tensor("dweights", dweights, shape=(B, T, J), dtypes=FLOAT_DTYPES)
    if dtype not in FLOAT_DTYPES:
        raise InputError(f"dtype: {dtype} is not accepted; use one of {', '.join(str(d) for d in FLOAT_DTYPES)}")
    cfg = resolve_config(config, DEFAULT_CONFIG, "routing_bwd")
    require_triton_device(weights, idx, dweights)
    E = num_memories
    dl = output_tensor(out, "dlogits", (B, T, E), dtype, weights.device)
    BT = B * T
    if BT:
        _route_weights_bwd_kernel[(triton.cdiv(BT, cfg["BLOCK_T"]),)](
            weights.contiguous(), idx.contiguous(), dweights.contiguous(), dl, BT, E, J,
            K=topk, BLOCK_T=cfg["BLOCK_T"], BLOCK_E=triton.next_power_of_2(E), num_warps=cfg["num_warps"],
        )
    return dl
