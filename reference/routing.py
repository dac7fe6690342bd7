"""Routing, grouping into per-(batch, memory) segments, and the weighted merge back.

Packed layout: segment ``s = b * E + m`` holds, in time order, the tokens of batch row ``b``
routed to memory ``m``; segments lie back to back (``cu_seqlens`` over all B*E segments, empty
ones kept), so the packed length is B*T*topk. Tokens masked out (padding) are in no segment:
their rows follow the last segment (``cu_seqlens[-1]`` counts the rows in segments only).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Grouping(NamedTuple):
    """Where every (token, choice) pair lives in the packed, memory-grouped layout.

    cu_seqlens  [B*E + 1] int64   segment bounds, segment s = b*E + m
    token_index [B*T*topk] int64  flat token index b*T + t of each packed row
    slot        [B, T, topk] int64  packed row of token (b, t)'s j-th choice (inverse map)
    """

    cu_seqlens: torch.Tensor
    token_index: torch.Tensor
    slot: torch.Tensor


def route(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32 (float64 stays float64), top-k, renormalise.

    logits [..., E] -> (weights [..., topk] float, idx [..., topk] int64)
    """
    from momtune.checks import check_int

    check_int("topk", topk, lo=1, hi=logits.shape[-1])
    p = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    w, idx = torch.topk(p, topk, dim=-1)
    return w / w.sum(-1, keepdim=True), idx


def group(idx: torch.Tensor, num_memories: int, valid: torch.Tensor | None = None,
          seq_offsets: torch.Tensor | None = None) -> Grouping:
    """Stable grouping of routed tokens. idx [B, T, topk] (memory ids) -> :class:`Grouping`.

    ``valid`` [B, T] bool (optional): tokens that are False join no segment; their rows come
    after every segment's, in (batch, time, choice) order. ``seq_offsets`` [S+1] (optional,
    B = 1): the T tokens are S packed sequences, and sequence i plays the part of a batch row
    (segment s = i*M + m).
    """
    B, T, K = idx.shape
    if seq_offsets is None:
        rows = torch.arange(B, device=idx.device)[:, None, None].expand(B, T, 1)
        n_rows = B
    else:
        n_rows = seq_offsets.numel() - 1
        rows = torch.searchsorted(seq_offsets[1:].to(idx.device), torch.arange(T, device=idx.device),
                                  right=True).view(1, T, 1)
    S = n_rows * num_memories
    seg = (rows * num_memories + idx).reshape(-1)
    if valid is not None:
        seg = torch.where(valid[:, :, None].expand(B, T, K).reshape(-1), seg, S)
    counts = torch.bincount(seg, minlength=S + 1)[:S]
    cu = torch.zeros(S + 1, dtype=torch.int64, device=idx.device)
    cu[1:] = counts.cumsum(0)
    order = torch.argsort(seg, stable=True)  # flattened (b, t, j) order -> time order inside a segment
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.numel(), device=idx.device)
    return Grouping(cu, order // K, slot.view(B, T, K))


def merge(o_packed: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y[b, t] = sum_j weights[b, t, j] * o_packed[slot[b, t, j]].

    o_packed [B*T*topk, ...], slot/weights [B, T, topk] -> [B, T, ...] (in o_packed's dtype,
    accumulated in the weights' precision).
    """
    rows = o_packed[slot]  # [B, T, topk, ...]
    w = weights.reshape(*weights.shape, *([1] * (rows.dim() - 3)))
    return (rows.to(weights.dtype) * w).sum(2).to(o_packed.dtype)
