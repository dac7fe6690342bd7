"""bfloat16 in Triton's interpreter (issue 15, item 7): its bf16 ``tl.dot`` returns garbage, so
backend 'triton' refuses bf16 there with an error naming the backend, the dtype and what runs,
and 'auto' runs the reference (said once); float32 and float16 keep the Triton path."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import momtune
import momtune.model
from momtune.errors import InputError
from momtune.model import resolve_backend

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ARGS = {"hidden_size": 32, "head_dim": 16, "num_heads": 2, "expand_v": 1, "num_memories": 3, "topk": 2,
        "shared_mem": True, "layer_idx": 0}
REFUSED = r"backend: 'triton' cannot run bfloat16 in Triton's interpreter.*float32 and float16.*CUDA GPU"


@pytest.fixture
def interpreter(monkeypatch):
    """The interpreter switched on (as far as momtune's settings see), and "said once" messages fresh."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(momtune.model, "_said", set())


def _no_kernels(monkeypatch, cls=momtune.MoMAttention):
    def refuse(*args, **kwargs):
        raise AssertionError("no Triton kernel may run for bfloat16 in the interpreter")
    monkeypatch.setattr(cls, "_prefill", refuse)
    monkeypatch.setattr(cls, "_decode", refuse)


def _warned(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


@pytest.mark.parametrize("where", ["input", "weights"])
def test_triton_refuses_bf16_in_the_interpreter(interpreter, where):
    x = torch.zeros(1, 2, 32, dtype=torch.bfloat16 if where == "input" else torch.float32)
    layer = momtune.MoMAttention(**ARGS).to(torch.bfloat16 if where == "weights" else torch.float32)
    with torch.no_grad(), pytest.raises(InputError, match=REFUSED):
        resolve_backend("triton", x, layer)


def test_auto_runs_the_reference_for_bf16_and_says_so_once(interpreter):
    x = torch.zeros(1, 2, 32, dtype=torch.bfloat16)
    backend, said = _warned(lambda: resolve_backend("auto", x))
    assert backend == "reference"
    assert len(said) == 1 and "bfloat16" in said[0] and "reference" in said[0] and "interpreter" in said[0], said
    backend, said = _warned(lambda: resolve_backend("auto", x))
    assert backend == "reference" and not said
    assert resolve_backend("reference", x) == "reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_float32_and_float16_keep_the_triton_path(interpreter, dtype):
    x = torch.zeros(1, 2, 32, dtype=dtype)
    layer = momtune.MoMAttention(**ARGS).to(dtype)
    with torch.no_grad():
        assert resolve_backend("triton", x, layer) == "triton"
        assert resolve_backend("auto", x, layer) == "triton"


def test_bf16_layer(interpreter, monkeypatch):
    """A bf16 layer: 'triton' raises before any kernel; 'auto' returns the reference's output."""
    _no_kernels(monkeypatch)
    torch.manual_seed(0)
    fast = momtune.MoMAttention(**ARGS, backend="triton").to(torch.bfloat16).eval()
    ref = momtune.reference.MoMAttention(**ARGS).to(torch.bfloat16).eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    with torch.no_grad():
        with pytest.raises(InputError, match=REFUSED):
            fast(x)
        with pytest.raises(InputError, match=REFUSED):  # packed sequences pick their path too
            fast(x[:1], cu_seqlens=torch.tensor([0, 2, 5]))
        fast.backend = "auto"
        (out, logits, _), said = _warned(lambda: fast(x))
        want, want_logits, _ = ref(x)
    assert torch.equal(out, want) and torch.equal(logits, want_logits)
    assert len(said) == 1 and "bfloat16" in said[0], said


def test_bf16_lm(interpreter, monkeypatch):
    """A bf16 LM: 'triton' raises (forward and generate) before any kernel; 'auto' returns the
    reference's logits and generations, said once for the whole model."""
    _no_kernels(monkeypatch)

    def refuse(*args, **kwargs):
        raise AssertionError("no Triton kernel may run for bfloat16 in the interpreter")

    monkeypatch.setattr("momtune.kernels.norm.add_rms_norm", refuse)
    monkeypatch.setattr("momtune.kernels.swiglu.swiglu", refuse)
    cfg = momtune.MoMConfig.from_preset("tiny")
    torch.manual_seed(0)
    fast = momtune.MoMForCausalLM(cfg, backend="triton").to(torch.bfloat16).eval()
    ref = momtune.reference.MoMForCausalLM(cfg).to(torch.bfloat16).eval()
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 4))
    with torch.no_grad(), pytest.raises(InputError, match=REFUSED):
        fast(ids)
    with pytest.raises(InputError, match=REFUSED):
        fast.generate(ids, 2)
    auto = momtune.MoMForCausalLM(cfg, backend="auto").to(torch.bfloat16).eval()
    auto.load_state_dict(ref.state_dict())
    with torch.no_grad():
        got, said = _warned(lambda: auto(ids).logits)
        want = ref(ids).logits
    assert torch.equal(got, want)
    assert sum("bfloat16" in s for s in said) == 1, said
    assert torch.equal(auto.generate(ids, 2), ref.generate(ids, 2))


@pytest.mark.skipif(not INTERP, reason="runs the kernels in Triton's interpreter (TRITON_INTERPRET=1)")
def test_float32_in_the_interpreter_runs_the_kernels(interpreter, monkeypatch):
    """backend 'auto' with float32 CPU tensors in the interpreter runs the Triton prefill."""
    calls = []
    real = momtune.MoMAttention._prefill

    def spy(self, *args, **kwargs):
        calls.append(args[0].dtype)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(momtune.MoMAttention, "_prefill", spy)
    layer = momtune.MoMAttention(**ARGS, backend="auto").eval()
    with torch.no_grad():
        _, said = _warned(lambda: layer(torch.randn(1, 3, 32)))
    assert calls == [torch.float32] and not said
