"""`momtune bench` as a pytest-benchmark suite (GPU only):

    python -m pytest -m gpu tests/bench --benchmark-json bench-pytest.json

Same cases as the CLI (mom-340m layer prefill at B 8, T 2048; layer decode at batch 1 and 32)
for momtune, fla 0.6.0 and the reference, each correct against momtune before it is timed.
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
    return cfg, make_layer("reference", cfg, torch.float32, None).state_dict()


def _sync(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_prefill_B8_T2048(benchmark, layer_state, impl):
    from momtune.bench import make_layer

    cfg, state = layer_state
    x = torch.randn(8, 2048, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    layer = make_layer(impl, cfg, torch.bfloat16, state)
    with torch.no_grad():
        out = benchmark.pedantic(_sync(lambda: layer(x)[0]), rounds=3 if impl == "reference" else 20,
                                 warmup_rounds=1)
        base = make_layer("momtune", cfg, torch.bfloat16, state)(x)[0]
    assert torch.isfinite(out).all()
    assert ((out.float() - base.float()).norm() / base.float().norm()).item() < 3e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B", [1, 32])
def test_layer_decode_step(benchmark, layer_state, impl, B):
    from momtune.bench import _fla_cache, make_layer
    from momtune.reference.cache import MoMCache

    cfg, state = layer_state
    x = torch.randn(B, 17, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    layer = make_layer(impl, cfg, torch.bfloat16, state)
    with torch.no_grad():
        cache = _fla_cache() if impl == "fla" else MoMCache()
        layer(x[:, :16], past_key_values=cache, use_cache=True)
        out = benchmark.pedantic(_sync(lambda: layer(x[:, 16:], past_key_values=cache, use_cache=True)[0]),
                                 rounds=5 if impl == "reference" else 50, warmup_rounds=2)
    assert out.shape == (B, 1, cfg.hidden_size) and torch.isfinite(out).all()
