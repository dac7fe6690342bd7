"""The fast causal LM (momtune.lm): fused blocks against the reference, its op budget, and
training under autograd (backward kernels; the reference where a call has none)."""
from __future__ import annotations

import os

import pytest
import torch

import momtune
from momtune.errors import InputError
from momtune.lm import MoMBlock, RMSNorm
from momtune.reference.cache import MoMCache
from tests.helpers import AtenOps, assert_close, nudged, within_own_error

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_kernels = pytest.mark.skipif(not INTERP and not torch.cuda.is_available(),
                                   reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(seed: int = 0, **overrides):
    cfg = momtune.MoMConfig.from_preset("tiny", **overrides)
    torch.manual_seed(seed)
    fast = momtune.MoMForCausalLM(cfg, backend="triton").to(DEVICE).eval()
    ref = momtune.reference.MoMForCausalLM(cfg).to(DEVICE).eval()
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():  # norm weights away from 1, so a dropped weight would show
        for p in fast.parameters():
            if p.dim() == 1 and torch.all(p == 1):
                p.uniform_(0.5, 1.5)
    ref.load_state_dict(fast.state_dict())
    return cfg, fast, ref


def test_fast_lm_keeps_the_reference_parameters():
    cfg, fast, ref = _pair()
    assert set(fast.state_dict()) == set(ref.state_dict())
    assert all(isinstance(b, MoMBlock) for b in fast.model.layers) and isinstance(fast.model.norm, RMSNorm)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(fast) == count(ref), "the fast modules hold no second copy of a weight"
    block = fast.model.layers[0]
    with torch.no_grad():
        block.mlp_norm.weight.fill_(2.0)  # the wrapped modules are the live ones
    assert torch.equal(fast.state_dict()["model.layers.0.mlp_norm.weight"], torch.full((cfg.hidden_size,), 2.0))


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 9), (1, 1), (3, 4)], ids=lambda s: f"B{s[0]}-T{s[1]}")
def test_fused_blocks_match_reference_prefill_and_decode(shape):
    B, T = shape
    cfg, fast, ref = _pair(seed=B * 10 + T)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 2), device=DEVICE)
    with torch.no_grad():
        c_fast, c_ref = MoMCache(), MoMCache()
        got = [fast(ids[:, :T], past_key_values=c_fast).logits]
        want = [ref(ids[:, :T], past_key_values=c_ref).logits]
        for i in range(T, T + 2):
            got.append(fast(ids[:, i:i + 1], past_key_values=c_fast).logits)
            want.append(ref(ids[:, i:i + 1], past_key_values=c_ref).logits)
    for step, (g, w) in enumerate(zip(got, want)):
        assert_close(f"logits step {step}", g, w, 2e-3, 2e-3)


@needs_kernels
def test_decode_step_is_gemms_and_kernels_only(monkeypatch):
    """One decode step of the whole LM: per layer the attention's two GEMMs, gate/up, and down as
    addmm (its residual add fused); plus the embedding and the LM head. Norms, residual adds and
    the SwiGLU activation are kernels; no copies, no host sync."""
    monkeypatch.setenv("MOMTUNE_CHECKS", "shapes")
    cfg, fast, _ = _pair()
    ids = torch.randint(0, cfg.vocab_size, (2, 5), device=DEVICE)
    with torch.no_grad():
        cache = MoMCache()
        fast(ids, past_key_values=cache)
        fast._step_logits(ids[:, :1], cache)
        with AtenOps() as ops:
            fast._step_logits(ids[:, 1:2], cache)
    L = cfg.num_hidden_layers
    assert ops.work() == {"embedding": 1, "mm": 4 * L + 1, "addmm": L}, ops.ops


@needs_kernels
def test_prefill_is_gemms_and_kernels_plus_one_ids_check(monkeypatch):
    """An LM prefill: per layer the attention's two GEMMs and its router-logits copy, gate/up and
    down+residual; plus the embedding, the LM head, and one host check that the ids are in the
    vocabulary (an out-of-range id would otherwise kill the CUDA context in the embedding)."""
    monkeypatch.setenv("MOMTUNE_CHECKS", "shapes")
    cfg, fast, _ = _pair()
    ids = torch.randint(0, cfg.vocab_size, (2, 5), device=DEVICE)
    with torch.no_grad():
        fast(ids)
        with AtenOps() as ops:
            fast(ids)
    L = cfg.num_hidden_layers
    ids_check = {"lt": 1, "ge": 1, "bitwise_or": 1, "any": 1, "_local_scalar_dense": 1}
    assert ops.work() == {**ids_check, "embedding": 1, "mm": 4 * L + 1, "addmm": L, "clone": L}, ops.ops


def test_triton_backend_trains_a_prefill_and_refuses_what_has_no_backward():
    """A prefill without a cache (plain or masked) trains on the kernels with backend 'triton'; a
    call with a cache has no backward kernels: with autograd recording 'triton' raises (naming the
    backend and the way out) instead of returning outputs whose gradients would silently be lost."""
    layer = momtune.MoMAttention(hidden_size=32, head_dim=16, num_heads=2, num_memories=2, topk=1, backend="triton")
    x = torch.randn(1, 3, 32, device=DEVICE)
    layer.to(DEVICE)
    if not INTERP and DEVICE == "cpu":
        pytest.skip("the triton backend needs CUDA or the interpreter")
    mask = torch.ones(1, 3, dtype=torch.long, device=DEVICE)
    mask[0, 0] = 0
    layer(x, attention_mask=mask)[0].sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    with pytest.raises(InputError, match="backend.*no_grad"):
        layer(x, use_cache=True)
    with torch.no_grad():
        assert layer(x, use_cache=True)[0].shape == (1, 3, 32)


@needs_kernels
def test_auto_backend_trains_a_cached_call_on_the_reference(monkeypatch):
    """backend 'auto' with autograd recording and a cache (no backward kernels for it) runs the
    reference (says so once), so the gradients of every parameter are still there."""
    import momtune.model

    monkeypatch.setattr(momtune.model, "_said", set())  # "once" per process: fresh for this test
    torch.manual_seed(1)
    layer = momtune.MoMAttention(hidden_size=32, head_dim=16, num_heads=2, num_memories=2, topk=1,
                                 backend="auto").to(DEVICE)
    x = torch.randn(2, 6, 32, device=DEVICE)
    with pytest.warns(UserWarning, match="autograd is recording"):
        out = layer(x, use_cache=True)[0]
    out.sum().backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None]
    assert not missing, missing


@needs_kernels
def test_left_padded_batch_matches_reference():
    """attention_mask through the fast LM: logits at real tokens and left-padded generation equal
    the reference's."""
    cfg, fast, ref = _pair(seed=5)
    ids = torch.randint(1, cfg.vocab_size, (3, 7), device=DEVICE)
    mask = torch.ones(3, 7, dtype=torch.long, device=DEVICE)
    mask[1, :4] = 0
    mask[2, :6] = 0
    with torch.no_grad():
        got = fast(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=mask).logits
    real = mask == 1
    assert_close("logits", got[real], want[real], 2e-3, 2e-3)
    assert torch.equal(fast.generate(ids, 3, attention_mask=mask), ref.generate(ids, 3, attention_mask=mask))


def test_generate_checks_its_arguments_on_every_path():
    cfg, fast, _ = _pair()
    ids = torch.randint(0, cfg.vocab_size, (1, 3), device=DEVICE)
    with pytest.raises(InputError, match="temperature"):
        fast.generate(ids, 3, do_sample=True, temperature=0.0)
    with pytest.raises(InputError, match="top_k"):
        fast.generate(ids, 3, do_sample=True, top_k=0)


@needs_kernels
def test_auto_training_step_runs_every_backward_kernel(monkeypatch):
    """Issue 14: with autograd recording, backend 'auto' runs the LM's norms, SwiGLU and the
    attention's prefill forward and backward on their kernels (the recurrence's backward is
    its hand-written chunk backward, all on Triton kernels: chunk terms, two scans, chunk gradients),
    and every gradient matches the float64 reference LM's within
    4 x the float32 reference's own error. That error is the largest of seven float32 reference
    runs, one on the parameters as they are and six with every parameter moved by one unit in
    the last place (random signs; tests.helpers.nudged): a gradient that cancels strongly (A_log's
    and dt_bias's sum dg * g over every row) has a wide spread of float32 errors (seed 4, dt_bias:
    0.8e-6 plain, up to 4.2e-6 over eight nudged runs; the kernels' 7.4e-6), which one run misses."""
    import warnings

    import momtune.functions
    from momtune.kernels.conv import backward as conv_bwd
    from momtune.kernels.merge import backward as merge_bwd
    from momtune.kernels.norm import backward as norm_bwd
    from momtune.kernels.recurrence import chunk_bwd
    from momtune.kernels.routing import backward as routing_bwd
    from momtune.kernels.swiglu import backward as swiglu_bwd

    calls = {"norm_bwd": 0, "swiglu_bwd": 0, "conv_bwd": 0, "merge_bwd": 0, "routing_bwd": 0, "chunk_bwd": 0}

    def counted(mod, name, key):
        fn = getattr(mod, name)

        def wrapper(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        monkeypatch.setattr(mod, name, wrapper)

    counted(norm_bwd, "rms_norm_backward", "norm_bwd")
    counted(swiglu_bwd, "swiglu_backward", "swiglu_bwd")
    counted(conv_bwd, "segment_conv_backward", "conv_bwd")
    counted(merge_bwd, "merge_backward", "merge_bwd")
    counted(routing_bwd, "route_weights_backward", "routing_bwd")
    counted(chunk_bwd, "chunk_backward", "chunk_bwd")
    cfg, fast, ref = _pair(seed=4)
    fast.backend = "auto"
    for m in fast.modules():
        if hasattr(m, "backend"):
            m.backend = "auto"
    fast.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 7), device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back to the reference (it would say so)
        loss = fast(ids, labels=ids).loss
    loss.backward()
    L = cfg.num_hidden_layers
    # attn_norm, mlp_norm per block and the final norm; q, k, v convs per layer
    assert calls == {"norm_bwd": 2 * L + 1, "swiglu_bwd": L, "conv_bwd": 3 * L, "merge_bwd": L,
                     "routing_bwd": L, "chunk_bwd": L}, calls
    assert momtune.functions  # the module the LM trains through
    names = [n for n, _ in fast.named_parameters()]
    assert all(p.grad is not None for p in fast.parameters())
    state = fast.state_dict()

    def reference_grads(dt: torch.dtype, nudge: int | None = None) -> dict:
        r = momtune.reference.MoMForCausalLM(cfg).to(DEVICE, dt).train()
        r.load_state_dict(nudged(state, dt, nudge))
        r(ids, labels=ids).loss.backward()
        return {n: p.grad.double() for n, p in r.named_parameters()}

    runs32 = [reference_grads(torch.float32, k) for k in (None, *range(1, 7))]
    got = {n: p.grad.double() for n, p in fast.named_parameters()}
    assert sorted(got) == sorted(names)
    within_own_error(got, reference_grads(torch.float64), runs32, floor=torch.finfo(torch.float32).eps)
