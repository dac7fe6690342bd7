"""recurrent_chunked == recurrent_naive (float64) over ragged segments, and gradients (gradcheck)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from momtune.reference.recurrence import recurrent_chunked, recurrent_naive
from tests.helpers import assert_close
from tests.reference.common import max_rel

RULES = ("gated_delta", "gated_linear")


def _inputs(lengths: list[int], H: int, K: int, V: int, seed: int, init: bool):
    g = torch.Generator().manual_seed(seed)
    N, S = sum(lengths), len(lengths)
    q = torch.randn(N, H, K, generator=g, dtype=torch.float64)
    k = torch.randn(N, H, K, generator=g, dtype=torch.float64)
    v = torch.randn(N, H, V, generator=g, dtype=torch.float64)
    gl = -F.softplus(torch.randn(N, H, generator=g, dtype=torch.float64))  # log decay < 0
    beta = torch.rand(N, H, generator=g, dtype=torch.float64)
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    h0 = torch.randn(S, H, K, V, generator=g, dtype=torch.float64) if init else None
    return q, k, v, gl, beta, cu, h0


@pytest.mark.parametrize("init", [False, True], ids=["h0none", "h0rand"])
@pytest.mark.parametrize("chunk", [1, 16, 64], ids=lambda c: f"BT{c}")
@pytest.mark.parametrize("T", [1, 7, 63, 65], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("rule", RULES)
def test_chunked_equals_naive(rule: str, T: int, chunk: int, init: bool) -> None:
    # a long segment, an empty one, a length-1 one, a short one, another empty one at the end
    lengths = [T, 0, 1, 5, 0]
    q, k, v, g, beta, cu, h0 = _inputs(lengths, H=2, K=8, V=6, seed=T * 7 + chunk, init=init)
    o_ref, s_ref = recurrent_naive(q, k, v, g, beta, cu_seqlens=cu, rule=rule, initial_state=h0)
    o, s = recurrent_chunked(q, k, v, g, beta, cu_seqlens=cu, rule=rule, initial_state=h0, chunk_size=chunk)
    assert o.dtype == s.dtype == torch.float64 and s.shape == (len(lengths), 2, 8, 6)
    assert max_rel(o, o_ref) <= 1e-10, max_rel(o, o_ref)
    assert max_rel(s, s_ref) <= 1e-10, max_rel(s, s_ref)
    assert_close("o", o, o_ref, atol=1e-12, rtol=1e-10)
    assert_close("final_state", s, s_ref, atol=1e-12, rtol=1e-10)
    # empty segments hand their initial state through unchanged
    for s_idx in (1, 4):
        want = h0[s_idx] if h0 is not None else torch.zeros_like(s[s_idx])
        assert torch.equal(s[s_idx], want)


def test_naive_matches_hand_step() -> None:
    """One token, one head: S1 = e^g S0 + k beta (v - (e^g S0)^T k)^T, o = K^-1/2 S1^T q (q, k normalised)."""
    q, k, v, g, beta, cu, h0 = _inputs([1], H=1, K=3, V=2, seed=3, init=True)
    qn = q[0, 0] / torch.sqrt((q[0, 0] ** 2).sum() + 1e-6)
    kn = k[0, 0] / torch.sqrt((k[0, 0] ** 2).sum() + 1e-6)
    S = h0[0, 0] * torch.exp(g[0, 0])
    S = S + torch.outer(kn, beta[0, 0] * (v[0, 0] - S.t() @ kn))
    o, s = recurrent_naive(q, k, v, g, beta, cu_seqlens=cu, initial_state=h0)
    assert_close("state", s[0, 0], S, atol=1e-14, rtol=1e-12)
    assert_close("o", o[0, 0], 3 ** -0.5 * S.t() @ qn, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("rule", RULES)
def test_gradcheck_chunked(rule: str) -> None:
    """N=6, H=1, K=V=3, two segments (2 and 4 tokens), chunk 2 so a segment spans chunks."""
    q, k, v, g, beta, cu, h0 = _inputs([2, 4], H=1, K=3, V=3, seed=11, init=True)
    names = ("q", "k", "v", "g", "beta", "h0") if rule == "gated_delta" else ("q", "k", "v", "g", "h0")
    given = dict(q=q, k=k, v=v, g=g, beta=beta, h0=h0)
    leaves = tuple(given[n].clone().requires_grad_(True) for n in names)

    def fn(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = dict(zip(names, args))
        return recurrent_chunked(a["q"], a["k"], a["v"], a["g"], a.get("beta"), cu_seqlens=cu, rule=rule,
                                 initial_state=a["h0"], chunk_size=2)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)
    o, s = fn(*leaves)
    (o.sum() + s.sum()).backward()
    for name, leaf in zip(names, leaves):  # every input really receives a gradient
        assert leaf.grad is not None and leaf.grad.abs().max() > 0, name


@pytest.mark.parametrize(("cu", "chunk"), [([0, 13, 13, 40], 8), ([0, 70], 16), ([0, 1, 5], 4), ([0, 33], 64),
                                           ([0, 0, 9], 4)],
                         ids=["ragged-empty", "one-segment", "short", "under-one-chunk", "leading-empty"])
def test_hand_written_backward_matches_autograd(cu: list[int], chunk: int) -> None:
    """gated_delta_backward (the chunk-by-chunk backward a kernel follows) in float32 against
    float64 autograd of recurrent_chunked, within 4 x autograd's own float32 error, for every
    input's gradient; ragged segments, empty ones, a partial last chunk."""
    from momtune.reference.recurrence import gated_delta_backward

    from tests.helpers import gated_delta_autograd, gated_delta_case

    import momtune.reference.recurrence as rec

    case = gated_delta_case(cu, 2, 8, 6, seed=len(cu) * 100 + chunk)
    want, want32 = (gated_delta_autograd(case, dt, chunk) for dt in (torch.float64, torch.float32))
    args = [case[n] for n in ("q", "k", "v", "g", "beta", "do")]
    got = gated_delta_backward(*args, cu_seqlens=case["cu_seqlens"], chunk_size=chunk)
    old = rec.GRAD_GROUP_BYTES
    try:  # the chunk gradients one chunk at a time: the same answer
        rec.GRAD_GROUP_BYTES = 1
        one_by_one = gated_delta_backward(*args, cu_seqlens=case["cu_seqlens"], chunk_size=chunk)
    finally:
        rec.GRAD_GROUP_BYTES = old
    for a, b in zip(got, one_by_one):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, a, w, w32 in zip(("dq", "dk", "dv", "dg", "dbeta"), got, want, want32):
        assert a.dtype == torch.float32 and a.shape == w.shape
        err, own = (float((x.double() - w).norm() / w.norm()) for x in (a, w32))
        assert err <= 4 * max(own, torch.finfo(torch.float32).eps), (name, err, own)
