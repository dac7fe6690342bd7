"""Padding masks (attention_mask, as fla's MomAttention): a masked token joins no memory, reads
and writes no state, and outputs 0; so a padded batch equals each row run alone without its
padding, through prefill, cache and decode."""
from __future__ import annotations

import pytest
import torch

from momtune.reference.cache import MoMCache
from tests.helpers import assert_close
from tests.reference.common import make_layer

B, T = 4, 11


def make_mask(kind: str) -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.int64)
    if kind == "left-pad":
        for b, pad in enumerate([0, 3, 10, 7]):
            m[b, :pad] = 0
    elif kind == "right-pad":
        for b, pad in enumerate([2, 0, 5, 9]):
            m[b, T - pad:] = 0
    elif kind == "holes":
        m = (torch.rand(B, T, generator=torch.Generator().manual_seed(5)) > 0.35).long()
        m[0] = 1
    elif kind == "empty-row":
        m[1] = 0
        m[2, ::2] = 0
    return m


KINDS = ["left-pad", "right-pad", "holes", "empty-row"]


def run_alone(layer, x: torch.Tensor, keep: torch.Tensor):
    """One row without its masked tokens (None if none is left), with a cache."""
    if not bool(keep.any()):
        return None
    cache = MoMCache()
    out, logits, _ = layer(x[None, keep], past_key_values=cache)
    return out[0], cache[0]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "noshared"])
@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_equals_rows_without_padding(kind: str, shared: bool) -> None:
    layer = make_layer(shared=shared, seed=2)
    torch.manual_seed(3)
    x = torch.randn(B, T, 24, dtype=torch.float64)
    mask = make_mask(kind)
    cache = MoMCache()
    with torch.no_grad():
        out, logits, _ = layer(x, attention_mask=mask, past_key_values=cache)
        assert_close("router_logits", logits, layer.gate(x).reshape(B * T, -1), 1e-12, 1e-12)
        for b in range(B):
            keep = mask[b] == 1
            assert torch.equal(out[b, ~keep], torch.zeros_like(out[b, ~keep])), "padding outputs 0"
            alone = run_alone(layer, x[b], keep)
            if alone is None:  # nothing real in this row: its memories stay empty
                assert not cache[0].state[b].any() and not cache[0].conv_k[b].any()
                continue
            o, entry = alone
            assert_close(f"o[{b}]", out[b, keep], o, 1e-12, 1e-12)
            assert_close(f"state[{b}]", cache[0].state[b], entry.state[0], 1e-12, 1e-12)
            for key in ("conv_q", "conv_k", "conv_v"):
                assert_close(f"{key}[{b}]", getattr(cache[0], key)[b], getattr(entry, key)[0], 1e-12, 1e-12)


def test_decode_after_padded_prefill_and_masked_step() -> None:
    """Left-padded prefill, then decode steps with the growing mask (HF style): each row equals
    its unpadded run; a step whose token is masked (row 2 at step 1) changes nothing of it."""
    layer = make_layer(seed=4)
    torch.manual_seed(6)
    x = torch.randn(B, T + 3, 24, dtype=torch.float64)
    mask = torch.cat([make_mask("left-pad"), torch.ones(B, 3, dtype=torch.int64)], dim=1)
    mask[2, T + 1] = 0
    cache = MoMCache()
    with torch.no_grad():
        outs = [layer(x[:, :T], attention_mask=mask[:, :T], past_key_values=cache)[0]]
        for i in range(T, T + 3):
            state_before = cache[0].state.clone()
            outs.append(layer(x[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache)[0])
            if i == T + 1:
                assert torch.equal(cache[0].state[2], state_before[2]) and not outs[-1][2].any()
        got = torch.cat(outs, dim=1)
        for b in range(B):
            keep = mask[b] == 1
            o, entry = run_alone(layer, x[b], keep)
            assert_close(f"o[{b}]", got[b, keep], o, 1e-12, 1e-12)
            assert_close(f"state[{b}]", cache[0].state[b], entry.state[0], 1e-12, 1e-12)


def test_all_ones_mask_changes_nothing() -> None:
    layer = make_layer(seed=1)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    with torch.no_grad():
        a = layer(x)[0]
        b = layer(x, attention_mask=torch.ones(2, 9, dtype=torch.bool))[0]  # longer masks: last T columns
    assert torch.equal(a, b)


def test_lm_left_padded_generate_equals_each_prompt_alone() -> None:
    """Batched generation of prompts of different lengths (left padding) gives each prompt's own
    greedy continuation; the aux loss counts only real tokens."""
    from momtune.reference.config import MoMConfig
    from momtune.reference.model import MoMForCausalLM

    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig.from_preset("tiny")).double().eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.attn.gate.weight.normal_(0, 0.5)
    V = model.config.vocab_size
    prompts = [torch.randint(1, V, (n,)) for n in (6, 2, 4)]
    L = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - p.numel():], mask[b, L - p.numel():] = p, 1
    out = model.generate(ids, 5, attention_mask=mask)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], 5)
        assert torch.equal(out[b, L:], alone[0, p.numel():]), f"prompt {b}"
    labels = torch.where(mask == 1, ids, -100)
    with torch.no_grad():
        padded = model(ids, labels=labels, attention_mask=mask)
        real = [model(p[None], labels=p[None]) for p in prompts]
    assert padded.aux_loss is not None and torch.isfinite(padded.aux_loss)
    # padding does not enter the aux loss: scrambling the padded tokens' ids leaves it unchanged
    scrambled = torch.where(mask == 1, ids, torch.randint(1, V, ids.shape))
    with torch.no_grad():
        again = model(scrambled, labels=labels, attention_mask=mask)
    assert_close("aux_loss", again.aux_loss, padded.aux_loss, 1e-12, 1e-12)
    # (the CE loss does change: the last pad position predicts the first real token, as in HF)
    assert all(torch.isfinite(r.loss) for r in real)


def test_packed_sequences_equal_each_sequence_alone() -> None:
    """cu_seqlens (fla's varlen input): hidden_states [1, N, D] with sequences of lengths 5, 0, 1
    and 9 gives each sequence's own output and cache row; a decode step with one token per
    sequence (cu_seqlens = 0..S) continues every sequence."""
    layer = make_layer(seed=8)
    torch.manual_seed(9)
    lengths = [5, 0, 1, 9]
    cu = torch.tensor([0, 5, 5, 6, 15])
    x = torch.randn(1, 15, 24, dtype=torch.float64)
    step = torch.randn(1, 4, 24, dtype=torch.float64)
    cache = MoMCache()
    with torch.no_grad():
        out, logits, _ = layer(x, past_key_values=cache, cu_seqlens=cu)
        nxt, _, _ = layer(step, past_key_values=cache, cu_seqlens=torch.arange(5))
        assert out.shape == (1, 15, 24) and logits.shape == (15, 4) and nxt.shape == (1, 4, 24)
        assert_close("router_logits", logits, layer.gate(x[0]), 1e-12, 1e-12)
        for i, n in enumerate(lengths):
            alone = MoMCache()
            seq = torch.cat([x[:, cu[i]:cu[i + 1]], step[:, i:i + 1]], dim=1)
            want = layer(seq, past_key_values=alone)[0]
            assert_close(f"o[{i}]", out[0, cu[i]:cu[i + 1]], want[0, :n], 1e-12, 1e-12)
            assert_close(f"next[{i}]", nxt[0, i], want[0, n], 1e-12, 1e-12)
            assert_close(f"state[{i}]", cache[0].state[i], alone[0].state[0], 1e-12, 1e-12)
