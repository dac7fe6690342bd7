"""route renormalises; group keeps time order and inverts exactly; merge is the weighted gather."""
from __future__ import annotations

import pytest
import torch

from momtune.errors import InputError
from momtune.reference.routing import group, merge, route
from tests.helpers import assert_close


@pytest.mark.parametrize("E,topk", [(4, 1), (4, 2), (6, 3), (5, 5)], ids=["E4-top1", "E4-top2", "E6-top3", "E5-top5"])
def test_route_renormalises(E: int, topk: int) -> None:
    torch.manual_seed(E * 10 + topk)
    logits = torch.randn(3, 7, E, dtype=torch.float64) * 2
    w, idx = route(logits, topk)
    assert w.shape == idx.shape == (3, 7, topk) and idx.dtype == torch.int64
    assert_close("sum(w)", w.sum(-1), torch.ones(3, 7, dtype=torch.float64), atol=1e-14, rtol=0)
    p = torch.softmax(logits, -1)
    chosen = p.gather(-1, idx)
    assert_close("w", w, chosen / chosen.sum(-1, keepdim=True), atol=1e-14, rtol=1e-12)
    # the chosen memories are the top-k by probability, distinct, in descending order
    assert bool((chosen[..., :-1] >= chosen[..., 1:]).all())
    kth = chosen[..., -1:]
    others = p.masked_fill(torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, True), -1.0)
    assert bool((others < kth).all())
    if topk == E:
        assert_close("w(top-E)", w, chosen, atol=1e-14, rtol=1e-12)  # nothing to renormalise


def test_route_fp32_weights_from_bf16_logits() -> None:
    w, _ = route(torch.randn(5, 4).bfloat16(), 2)
    assert w.dtype == torch.float32


@pytest.mark.parametrize("topk", [0, 5], ids=["top0", "top5-E4"])
def test_route_rejects_bad_topk(topk: int) -> None:
    with pytest.raises(InputError, match="topk"):
        route(torch.randn(2, 4), topk)


def _random_idx(B: int, T: int, E: int, topk: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, E, generator=g).topk(topk, -1).indices


@pytest.mark.parametrize("B,T,E,topk", [(2, 13, 4, 2), (1, 1, 4, 2), (3, 5, 8, 1), (2, 9, 3, 3), (2, 40, 1, 1)],
                         ids=["B2-T13-E4-top2", "B1-T1-E4-top2", "B3-T5-E8-top1", "B2-T9-E3-top3", "B2-T40-E1-top1"])
def test_grouping_time_order_property(B: int, T: int, E: int, topk: int) -> None:
    idx = _random_idx(B, T, E, topk, seed=B * 100 + T)
    grp = group(idx, E)
    cu, tok, slot = grp.cu_seqlens, grp.token_index, grp.slot
    assert cu.shape == (B * E + 1,) and tok.shape == (B * T * topk,) and slot.shape == (B, T, topk)
    assert int(cu[0]) == 0 and int(cu[-1]) == B * T * topk
    for b in range(B):
        for m in range(E):
            s = b * E + m
            rows = tok[cu[s]:cu[s + 1]].tolist()
            want = [b * T + t for t in range(T) if m in idx[b, t].tolist()]
            assert rows == want, f"segment (b={b}, m={m}) holds {rows}, expected {want} (time order)"
    # slot is the exact inverse: packed row of (b, t, j) holds token b*T+t inside segment b*E + idx[b, t, j]
    seg_of_row = torch.repeat_interleave(torch.arange(B * E), cu.diff())
    flat = torch.arange(B * T).view(B, T, 1).expand(B, T, topk)
    assert torch.equal(tok[slot], flat)
    assert torch.equal(seg_of_row[slot], torch.arange(B).view(B, 1, 1) * E + idx)
    assert sorted(slot.flatten().tolist()) == list(range(B * T * topk))


def test_grouping_empty_segments_and_one_memory() -> None:
    idx = torch.zeros(2, 6, 1, dtype=torch.int64)  # every token to memory 0 of E=3
    grp = group(idx, 3)
    assert grp.cu_seqlens.tolist() == [0, 6, 6, 6, 12, 12, 12]
    assert grp.token_index.tolist() == list(range(12))


def test_merge_is_weighted_gather() -> None:
    torch.manual_seed(0)
    B, T, J = 2, 5, 3
    idx = _random_idx(B, T, 4, J, seed=1)
    grp = group(idx, 4)
    o = torch.randn(B * T * J, 2, 3, dtype=torch.float64)
    w = torch.rand(B, T, J, dtype=torch.float64)
    y = merge(o, grp.slot, w)
    ref = torch.zeros(B, T, 2, 3, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for j in range(J):
                ref[b, t] += w[b, t, j] * o[int(grp.slot[b, t, j])]
    assert_close("merge", y, ref, atol=1e-14, rtol=1e-12)
