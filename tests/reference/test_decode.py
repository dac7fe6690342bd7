"""Decode with MoMCache: prefill + T=1 steps == full forward; a step touches only routed + shared memories."""
from __future__ import annotations

import pytest
import torch

from momtune.errors import InputError
from momtune.reference.cache import MoMCache
from momtune.reference.config import MoMConfig
from momtune.reference.model import MoMForCausalLM
from tests.helpers import assert_close
from tests.reference.common import make_layer, max_rel
from tests.reference.naive_mom import naive_mom_layer


def _tiny_lm(seed: int = 0, **overrides) -> MoMForCausalLM:
    torch.manual_seed(seed)
    model = MoMForCausalLM(MoMConfig.from_preset("tiny", **overrides)).double().eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.attn.gate.weight.normal_(0, 0.5)  # make routing vary from token to token
    return model


def _chunked_logits(model: MoMForCausalLM, ids: torch.Tensor, splits: list[int]) -> tuple[torch.Tensor, MoMCache]:
    """Feed ids through one cache in pieces ending at each split, then one token at a time."""
    cache, outs, start = MoMCache(), [], 0
    for end in splits + list(range(splits[-1] + 1, ids.shape[1] + 1)):
        out = model(ids[:, start:end], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        outs.append(out.logits)
        start = end
    return torch.cat(outs, dim=1), cache


DECODE = [("prefill5", [5]), ("prefill1", [1]), ("split-prefill-4-9", [4, 9]), ("prefill12-no-decode", [12])]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "noshared"])
@pytest.mark.parametrize("splits", [d[1] for d in DECODE], ids=[f"B2-T12-{d[0]}" for d in DECODE])
def test_prefill_then_decode_equals_full(splits: list[int], shared: bool) -> None:
    model = _tiny_lm(seed=1, shared_mem=shared)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    full = model(ids).logits
    stepped, cache = _chunked_logits(model, ids, splits)
    assert max_rel(stepped, full) <= 1e-9, max_rel(stepped, full)
    assert_close("logits", stepped, full, atol=1e-12, rtol=1e-9)
    assert cache.seen_tokens == 12 and len(cache) == 2


@pytest.mark.parametrize("shared,single_kv,W", [(True, False, 4), (False, False, 4), (True, True, 4), (True, False, 1)],
                         ids=["B2-T10-E4-top2-shared-W4", "B2-T10-E4-top2-noshared-W4",
                              "B2-T10-E4-top2-shared-singlekv-W4", "B2-T10-E4-top2-shared-W1"])
def test_layer_cache_matches_oracle_state(shared: bool, single_kv: bool, W: int) -> None:
    """Prefill 6 with a cache, then 4 single steps: outputs and the final cache equal the oracle's."""
    layer = make_layer(4, 2, shared, single_kv, seed=3, conv_size=W)
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    ref, end = naive_mom_layer(layer, x)
    cache = MoMCache()
    outs = [layer(x[:, :6], past_key_values=cache)[0]] + [layer(x[:, t:t + 1], past_key_values=cache)[0]
                                                          for t in range(6, 10)]
    assert_close("o", torch.cat(outs, 1), ref, atol=1e-12, rtol=1e-9)
    entry = cache[0]
    M = 4 + int(shared)
    assert entry.state.shape == (2, M, 2, 8, 16) and entry.conv_q.shape == (2, M, W - 1, 16)
    assert entry.conv_v.shape == (2, M, W - 1, 32) and entry.state.dtype == torch.float64
    for name in ("state", "conv_q", "conv_k", "conv_v"):
        assert_close(name, getattr(entry, name), end[name], atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("shared", [True, False], ids=["B3-T6+1-E4-top2-shared", "B3-T6+1-E4-top2-noshared"])
def test_decode_step_touches_only_routed_and_shared(shared: bool) -> None:
    layer = make_layer(4, 2, shared, seed=8)
    cache = MoMCache()
    layer(torch.randn(3, 6, 24, dtype=torch.float64), past_key_values=cache)
    before = {n: getattr(cache[0], n).clone() for n in ("state", "conv_q", "conv_k", "conv_v")}
    _, logits, _ = layer(torch.randn(3, 1, 24, dtype=torch.float64), past_key_values=cache)
    routed = logits.topk(2, -1).indices  # [B, 2]
    for b in range(3):
        touched = set(routed[b].tolist()) | ({4} if shared else set())
        for m in range(layer.num_slots):
            for name, old in before.items():
                same = torch.equal(getattr(cache[0], name)[b, m], old[b, m])
                assert same == (m not in touched), f"{name}[b={b}, m={m}] changed={not same}, routed={touched}"
    assert cache.seen_tokens == 7


def test_cache_fixed_size_lazy_and_checked() -> None:
    layer = make_layer(seed=0)
    short, long = MoMCache(), MoMCache()
    assert len(short) == 0 and short.seen_tokens == 0
    layer(torch.randn(2, 3, 24, dtype=torch.float64), past_key_values=short)
    layer(torch.randn(2, 40, 24, dtype=torch.float64), past_key_values=long)
    assert short[0].state.shape == long[0].state.shape == (2, 5, 2, 8, 16)
    assert short[0].conv_k.shape == long[0].conv_k.shape == (2, 5, 3, 16)
    with pytest.raises(InputError, match="past_key_values.*batch size 2"):
        layer(torch.randn(1, 1, 24, dtype=torch.float64), past_key_values=short)
    _, _, made = layer(torch.randn(1, 2, 24, dtype=torch.float64), use_cache=True)  # use_cache creates one
    assert isinstance(made, MoMCache) and made.seen_tokens == 2


def test_generate_matches_full_forward_argmax() -> None:
    model = _tiny_lm(seed=4)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], ids)
    seq = ids
    for _ in range(6):  # greedy decoding without a cache, one full forward per token
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1 = model.generate(ids, 4, do_sample=True, temperature=0.7, top_k=5, generator=g1)
    s2 = model.generate(ids, 4, do_sample=True, temperature=0.7, top_k=5, generator=g2)
    assert torch.equal(s1, s2)
    assert torch.equal(model.generate(ids, 4, do_sample=True, top_k=1), out[:, :9])  # top_k=1 is greedy
    with pytest.raises(InputError, match="temperature"):
        model.generate(ids, 2, do_sample=True, temperature=0.0)
