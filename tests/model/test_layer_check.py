"""momtune.layer_check: the layer comparison the GPU tests and the smoke use passes a correct
layer and rejects a wrong one (a 1% scale, a wrong router). Pure PyTorch: the
reference layer in float32 stands for the fast layer."""
from __future__ import annotations

import copy

import pytest
import torch

import momtune
from momtune.layer_check import check_layer

ARGS = dict(hidden_size=64, head_dim=16, num_heads=2, expand_v=1, num_memories=4, topk=2, shared_mem=True,
            layer_idx=0)


class Scaled(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x, **kw):
        o, logits, cache = self.inner(x, **kw)
        return o * self.scale, logits, cache


def _pair(seed: int):
    torch.manual_seed(seed)
    ref = momtune.reference.MoMAttention(**ARGS).double().eval()
    with torch.no_grad():  # a non-trivial, decaying memory
        ref.A_log.uniform_(-2, 0)
    return copy.deepcopy(ref).float(), ref


@pytest.mark.parametrize("kw", ["plain", "mask", "packed"])
def test_correct_layer_passes(kw):
    fast, ref = _pair(0)
    x = torch.randn(3, 40, 64)
    extra = {}
    if kw == "mask":
        extra["attention_mask"] = torch.ones(3, 40, dtype=torch.long)
        extra["attention_mask"][1, :10] = 0
    if kw == "packed":
        x = torch.randn(1, 90, 64)
        extra["cu_seqlens"] = torch.tensor([0, 40, 41, 90])
    ck = check_layer(fast, ref, x, **extra)
    assert ck.ok, ck.describe()
    assert ck.flips == 0
    assert 0 < ck.rel_err <= ck.bound


def test_one_percent_scale_fails():
    fast, ref = _pair(1)
    ck = check_layer(Scaled(fast, 1.01), ref, torch.randn(2, 33, 64))
    assert not ck.ok and ck.rel_err > 1e-3, ck.describe()


def test_wrong_router_fails():
    fast, ref = _pair(2)
    with torch.no_grad():
        fast.gate.weight.mul_(-1)  # routes to the memories float64 ranks last
    ck = check_layer(fast, ref, torch.randn(2, 33, 64))
    assert not ck.ok and ck.logit_err > ck.logit_bound and ck.flips > 0, ck.describe()
