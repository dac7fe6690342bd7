"""`momtune bench` as a pytest-benchmark suite (GPU only):

    python -m pytest -m gpu tests/bench --benchmark-json bench-pytest.json

Same cases as the CLI (mom-340m layer prefill at B 8, T 2048; layer decode at batch 1 and 32)
for momtune, fla 0.6.0 and the reference. Each is checked against the float64 reference by
momtune.layer_check after it is timed (routing pinned to the implementation's own router
logits; bound FACTOR x the error of the reference run in bf16), and the timed output must be
what a fresh call gives.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

IMPLS = ["momtune", "fla", "reference"]


@pytest.fixture(scope="module")
def layer_state():
    from momtune.bench import make_layer
    from momtune.reference.config import MoMConfig

    cfg = MoMConfig.from_preset("mom-340m")
    torch.manual_seed(0)
    state = make_layer("reference", cfg, torch.float32, None).state_dict()
    # float64 reference on the weights the bf16 layers hold
    ref64 = make_layer("reference", cfg, torch.float64, {k: v.to(torch.bfloat16).double() for k, v in state.items()})
    return cfg, state, ref64


def _sync(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


class _OutAndRouter(torch.nn.Module):
    """(output, router logits) of a layer call, whichever the implementation (fla's layer returns
    them at 0 and 3, momtune's and the reference's at 0 and 1)."""

    def __init__(self, impl: str, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer, self.at = layer, 3 if impl == "fla" else 1

    def forward(self, x, **kw):
        out = self.layer(x, **kw)
        return out[0], out[self.at]


class _PrefillThenStep(_OutAndRouter):
    """x [B, T, D]: a prefill of T - 1 tokens into a fresh cache, then one decode step; the
    outputs and router logits of both, as one call on x would give them."""

    def forward(self, x, **kw):
        from momtune.bench import _fla_cache
        from momtune.reference.cache import MoMCache

        B, E = x.shape[0], None
        cache = _fla_cache() if self.at == 3 else MoMCache()
        outs, logits = [], []
        for part in (x[:, :-1], x[:, -1:]):
            out = self.layer(part, past_key_values=cache, use_cache=True)
            E = out[self.at].shape[-1]
            outs.append(out[0])
            logits.append(out[self.at].reshape(B, part.shape[1], E))
        return torch.cat(outs, 1), torch.cat(logits, 1)


def _check(wrapper, ref64, x, timed, fresh):
    from momtune.layer_check import _rel, check_layer, pinned_router

    check = check_layer(wrapper, ref64, x)
    assert torch.isfinite(timed).all()
    if not check.ok:  # say which tokens: the prefill's or the last one's
        with torch.no_grad():
            out, logits = wrapper(x)
            with pinned_router(ref64, logits.double()):
                want = ref64(x.double())[0]
        parts = f"tokens :-1 {_rel(out[:, :-1], want[:, :-1]):.3e}, last token {_rel(out[:, -1:], want[:, -1:]):.3e}"
        raise AssertionError(f"{check.describe()}; {parts}")
    # the timed calls computed what a fresh call computes (no result cached or skipped)
    assert _rel(timed, fresh) <= check.bound, f"timed output {_rel(timed, fresh):.3e} from a fresh call's"
    return check


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_prefill_B8_T2048(benchmark, layer_state, impl):
    from momtune.bench import make_layer

    cfg, state, ref64 = layer_state
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(8, 2048, cfg.hidden_size, device="cuda", generator=gen).to(torch.bfloat16)
    layer = make_layer(impl, cfg, torch.bfloat16, state)
    with torch.no_grad():
        out = benchmark.pedantic(_sync(lambda: layer(x)[0].clone()), rounds=3 if impl == "reference" else 20,
                                 warmup_rounds=1)
        fresh = layer(x)[0]
    check = _check(_OutAndRouter(impl, layer), ref64, x, out, fresh)
    benchmark.extra_info.update(rel_err=check.rel_err, bound=check.bound, flips=check.flips)


#: fla 0.6.0's MomAttention at batch 1, T 16 (its fused_recurrent path) with a cache is 0.61 from
#: float64 over the 16 prefill tokens and the step (0.61 / 0.67), routing pinned, where the bound is
#: 0.013; at batch 32 it passes, and momtune and the reference pass at both (H200, 2026-11-28).
FLA_B1 = pytest.mark.xfail(strict=True, reason="fla 0.6.0 MomAttention is wrong at batch 1 with a cache")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B", [1, 32])
def test_layer_decode_step(benchmark, layer_state, impl, B, request):
    from momtune.bench import _fla_cache, make_layer
    from momtune.reference.cache import MoMCache

    if impl == "fla" and B == 1:
        request.applymarker(FLA_B1)
    cfg, state, ref64 = layer_state
    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(B, 17, cfg.hidden_size, device="cuda", generator=gen).to(torch.bfloat16)
    layer = make_layer(impl, cfg, torch.bfloat16, state)
    first = []

    def step():
        o = layer(x[:, 16:], past_key_values=cache, use_cache=True)[0].clone()
        if not first:
            first.append(o)
        return o

    with torch.no_grad():
        cache = _fla_cache() if impl == "fla" else MoMCache()
        layer(x[:, :16], past_key_values=cache, use_cache=True)
        out = benchmark.pedantic(_sync(step), rounds=5 if impl == "reference" else 50, warmup_rounds=2)
    assert out.shape == (B, 1, cfg.hidden_size)
    # the whole prefill-then-step against float64, on a fresh cache; the first timed call (from
    # the same 16-token state) must have given that step's output (later calls advance the cache)
    wrapper = _PrefillThenStep(impl, layer)
    with torch.no_grad():
        fresh = wrapper(x)[0][:, -1:]
    check = _check(wrapper, ref64, x, first[0], fresh)
    assert torch.isfinite(out).all()
    benchmark.extra_info.update(rel_err=check.rel_err, bound=check.bound, flips=check.flips)
