"""The reference MoMAttention against an independent token-by-token oracle (float64), plus checks."""
from __future__ import annotations

import math

import pytest
import torch

from momtune.errors import InputError, MomtuneError
from momtune.reference.layer import MoMAttention
from tests.helpers import assert_close
from tests.reference.common import LAYER_SIZES, layer_id, make_layer
from tests.reference.naive_mom import naive_mom_layer

TOL = dict(atol=1e-12, rtol=1e-9)

CASES = [  # B, T, E, topk, shared, single_kv
    (2, 13, 4, 2, True, False),
    (1, 1, 4, 2, True, False),
    (2, 7, 3, 1, False, False),
    (2, 9, 4, 4, True, False),
    (1, 70, 2, 1, True, False),  # the shared segment (70 tokens) spans two 64-token chunks
    (2, 5, 4, 2, False, True),
    (2, 6, 4, 2, True, True),
]


@pytest.mark.parametrize("B,T,E,topk,shared,single_kv", CASES, ids=[layer_id(*c) for c in CASES])
def test_layer_equals_token_by_token(B: int, T: int, E: int, topk: int, shared: bool, single_kv: bool) -> None:
    layer = make_layer(E, topk, shared, single_kv, seed=B * 31 + T)
    x = torch.randn(B, T, LAYER_SIZES["hidden_size"], dtype=torch.float64)
    o, router_logits, cache = layer(x)
    ref, _ = naive_mom_layer(layer, x)
    assert cache is None and o.dtype == torch.float64
    assert router_logits.shape == (B * T, E)
    assert_close("router_logits", router_logits, (x @ layer.gate.weight.t()).reshape(B * T, E), atol=1e-14, rtol=0)
    assert_close("o", o, ref, **TOL)


def test_fused_recurrent_mode_equals_chunk() -> None:
    chunk = make_layer(seed=5)
    rec = make_layer(seed=5, mode="fused_recurrent")
    rec.load_state_dict(chunk.state_dict())
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    assert_close("o", rec(x)[0], chunk(x)[0], **TOL)


def _forced_gate(layer: MoMAttention, coeffs: list[float]) -> torch.Tensor:
    """Gate rows c_m * u with u = 0.5/D * ones and positive inputs: logits ordered by c_m for every token."""
    D = layer.hidden_size
    with torch.no_grad():
        layer.gate.weight.copy_(torch.tensor(coeffs, dtype=torch.float64)[:, None] * (0.5 / D))
    return torch.rand(2, 9, D, dtype=torch.float64) + 0.5


FORCED = [  # coeffs, topk, memories that must stay empty
    ([3.0, 2.0, 1.0, -5.0], 1, {1, 2, 3}),  # every token to memory 0
    ([3.0, 2.0, 1.0, -5.0], 2, {2, 3}),  # every token to memories 0 and 1
    ([2.0, 3.0, -5.0, 1.0], 3, {2}),  # one memory gets no token
]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "noshared"])
@pytest.mark.parametrize("coeffs,topk,empty", FORCED, ids=["B2-T9-E4-top1-all-to-one", "B2-T9-E4-top2-two-dominate",
                                                          "B2-T9-E4-top3-one-empty"])
def test_forced_routing_empty_memories(coeffs: list[float], topk: int, empty: set, shared: bool) -> None:
    layer = make_layer(4, topk, shared, seed=7)
    x = _forced_gate(layer, coeffs)
    o, router_logits, cache = layer(x, use_cache=True)
    chosen = set(router_logits.topk(topk, -1).indices.flatten().tolist())
    assert chosen == set(range(4)) - empty, f"routing not forced as intended: {chosen}"
    ref, end = naive_mom_layer(layer, x)
    assert_close("o", o, ref, **TOL)
    # an empty memory's cache entry stays all zeros; used ones (and the shared) hold the oracle's state
    for m in range(layer.num_slots):
        if m in empty:
            assert not cache[0].state[:, m].any() and not cache[0].conv_k[:, m].any(), f"memory {m} touched"
        else:
            assert cache[0].state[:, m].abs().max() > 0
    assert_close("state", cache[0].state, end["state"], **TOL)
    for name in ("conv_q", "conv_k", "conv_v"):
        assert_close(name, getattr(cache[0], name), end[name], **TOL)


@pytest.mark.parametrize("shared", [True, False], ids=["B3-T10-E4-top2-shared", "B3-T10-E4-top2-noshared"])
def test_batch_equals_rows(shared: bool) -> None:
    layer = make_layer(4, 2, shared, seed=2)
    x = torch.randn(3, 10, 24, dtype=torch.float64)
    o, logits, _ = layer(x)
    for b in range(3):
        ob, lb, _ = layer(x[b:b + 1])
        assert_close(f"o[{b}]", o[b:b + 1], ob, atol=1e-13, rtol=1e-10)
        assert_close(f"logits[{b}]", logits.view(3, 10, 4)[b], lb, atol=1e-14, rtol=0)


def test_float32_close_to_float64() -> None:
    layer = make_layer(seed=4)
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    ref = layer(x)[0]
    o32, _, cache = layer.float()(x.float(), use_cache=True)
    assert o32.dtype == torch.float32 and cache[0].state.dtype == torch.float32
    assert_close("o fp32", o32, ref, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_used_parameter() -> None:
    layer = make_layer(4, 2, True, seed=9)
    x = torch.randn(2, 8, 24, dtype=torch.float64, requires_grad=True)
    o, _, _ = layer(x)
    (o ** 2).sum().backward()
    used = set(layer(x.detach())[1].topk(2, -1).indices.flatten().tolist())
    for name, p in layer.named_parameters():
        if any(name.startswith(f"{kind}.{m}.") for kind in ("k_proj", "v_proj", "b_proj", "a_proj")
               for m in range(4) if m not in used):
            continue
        assert p.grad is not None and p.grad.abs().max() > 0, f"no gradient for {name}"
    assert x.grad is not None and x.grad.abs().max() > 0


def test_parameter_names_and_shapes() -> None:
    layer = MoMAttention(hidden_size=24, head_dim=8, num_heads=2, expand_v=2, num_memories=3, shared_mem=True)
    want = {"q_proj.weight": (16, 24), "gate.weight": (3, 24), "A_log": (2,), "dt_bias": (2,),
            "q_conv1d.weight": (16, 1, 4), "k_conv1d.weight": (16, 1, 4), "v_conv1d.weight": (32, 1, 4),
            "g_proj.weight": (32, 24), "o_norm.weight": (16,), "o_proj.weight": (24, 32),
            "shared_k.weight": (16, 24), "shared_v.weight": (32, 24), "shared_b.weight": (2, 24),
            "shared_a.weight": (2, 24)}
    for m in range(3):
        want |= {f"k_proj.{m}.weight": (16, 24), f"v_proj.{m}.weight": (32, 24), f"b_proj.{m}.weight": (2, 24),
                 f"a_proj.{m}.weight": (2, 24)}
    got = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert got == want
    single = MoMAttention(hidden_size=24, head_dim=8, num_heads=2, expand_v=2, num_memories=3, single_kv_proj=True)
    names = set(single.state_dict())
    assert "shared_k.weight" in names and not any(n.startswith(("k_proj", "v_proj", "b_proj", "a_proj")) for n in names)


def test_fla_init() -> None:
    torch.manual_seed(0)
    layer = MoMAttention(hidden_size=64, head_dim=16, num_heads=4, expand_v=1, num_memories=2)
    A = layer.A_log.exp()
    assert bool(((A >= 0) & (A <= 16)).all())
    dt = torch.nn.functional.softplus(layer.dt_bias)  # dt_bias is the inverse softplus of dt
    assert bool(((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-6)).all())
    bound = 2 ** -2.5 * math.sqrt(6 / (64 + 64))  # xavier-uniform, gain 2^-2.5
    w = layer.q_proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert torch.equal(layer.o_norm.weight, torch.ones(16))


# ---------------------------------------------------------------- errors
BAD_CTOR = [
    (dict(topk=0), "topk"),
    (dict(topk=5, num_memories=4), "topk"),
    (dict(head_dim=16, expand_v=0.3), "expand_v"),  # V = 4.8
    (dict(head_dim=10, num_heads=3, expand_v=0.25), "expand_v"),  # value_dim 7.5 does not split into 3 heads
    (dict(num_heads=0), "num_heads"),
    (dict(hidden_size=-1), "hidden_size"),
    (dict(mode="parallel"), "mode"),
    (dict(use_short_conv=False), "use_short_conv"),
    (dict(use_output_gate=False), "use_output_gate"),
    (dict(conv_bias=True), "conv_bias"),
    (dict(num_memory=3), "num_memory"),
]


@pytest.mark.parametrize("kw,name", BAD_CTOR, ids=[n + "-" + "-".join(f"{k}{v}" for k, v in kw.items())
                                                  for kw, n in BAD_CTOR])
def test_constructor_errors(kw: dict, name: str) -> None:
    base = dict(hidden_size=16, head_dim=8, num_heads=2, expand_v=1, num_memories=4, topk=2)
    with pytest.raises(InputError, match=name):
        MoMAttention(**{**base, **kw})


BAD_INPUT = [
    ("rank2", lambda: torch.randn(5, 24, dtype=torch.float64), {}, "hidden_states"),
    ("lastdim", lambda: torch.randn(1, 5, 23, dtype=torch.float64), {}, "hidden_states"),
    ("int", lambda: torch.ones(1, 5, 24, dtype=torch.int64), {}, "hidden_states"),
    ("nan", lambda: torch.randn(1, 5, 24, dtype=torch.float64).index_fill_(1, torch.tensor([2]), float("nan")), {},
     "hidden_states"),
    ("inf", lambda: torch.randn(1, 5, 24, dtype=torch.float64).index_fill_(2, torch.tensor([0]), float("inf")), {},
     "hidden_states"),
    ("T0", lambda: torch.randn(1, 0, 24, dtype=torch.float64), {}, "hidden_states"),
    ("fp32-into-fp64", lambda: torch.randn(1, 5, 24), {}, "hidden_states"),
    ("mask-short", lambda: torch.randn(1, 5, 24, dtype=torch.float64), {"attention_mask": torch.ones(1, 4)},
     "attention_mask"),
    ("mask-rows", lambda: torch.randn(1, 5, 24, dtype=torch.float64), {"attention_mask": torch.ones(2, 5)},
     "attention_mask"),
    ("mask-3d", lambda: torch.randn(1, 5, 24, dtype=torch.float64), {"attention_mask": torch.ones(1, 5, 5)},
     "attention_mask"),
    ("cu_seqlens-end", lambda: torch.randn(1, 5, 24, dtype=torch.float64), {"cu_seqlens": torch.tensor([0, 4])},
     "cu_seqlens"),
    ("cu_seqlens-rows", lambda: torch.randn(2, 5, 24, dtype=torch.float64), {"cu_seqlens": torch.tensor([0, 5])},
     "hidden_states"),
    ("cu_seqlens-and-mask", lambda: torch.randn(1, 5, 24, dtype=torch.float64),
     {"cu_seqlens": torch.tensor([0, 5]), "attention_mask": torch.ones(1, 5)}, "attention_mask"),
    ("unknown-kwarg", lambda: torch.randn(1, 5, 24, dtype=torch.float64), {"position_ids": torch.arange(5)},
     "position_ids"),
    ("cache-type", lambda: torch.randn(1, 5, 24, dtype=torch.float64), {"past_key_values": {}}, "past_key_values"),
]


@pytest.mark.parametrize("make,kw,name", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_forward_errors(make, kw: dict, name: str) -> None:
    layer = make_layer()
    with pytest.raises(InputError, match=name) as info:
        layer(make(), **kw)
    assert isinstance(info.value, (MomtuneError, ValueError))
