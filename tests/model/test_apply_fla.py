"""momtune.apply on flash-linear-attention 0.6.0's own MoM model (issue 13, item 1).

fla's kernels do not run on the CPU, so here the applied fla model (every fla kernel in its path
swapped for momtune's, run in Triton's interpreter in float32) is compared with momtune's float64
reference LM holding the same weights, within a bound derived from the reference's own float32
error. The GPU test compares it with fla's model itself in bf16 and times a token before/after.
"""
from __future__ import annotations

import copy
import os
import time
import warnings

import pytest
import torch
from torch import nn

import momtune
from momtune.errors import InputError
from momtune.fla_compat import FlaGatedMLP, FlaMoMAttention, FlaRMSNorm
from momtune.gate import FACTOR, errors
from momtune.reference.checkpoint import as_config

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fla_layers = pytest.importorskip("fla.layers", reason="flash-linear-attention 0.6.0 is a test dependency")
    fla_models = pytest.importorskip("fla.models")
    fla_modules = pytest.importorskip("fla.modules")
    from fla.models.utils import Cache

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_kernels = pytest.mark.skipif(not INTERP and not torch.cuda.is_available(),
                                   reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (interpreter)")
CASES = [dict(topk=2, shared_mem=True), dict(topk=1, shared_mem=False)]
FLOOR32 = 2.0 ** -24  # a bound never below float32's unit roundoff


def _cid(c: dict) -> str:
    return f"top{c['topk']}-{'shared' if c['shared_mem'] else 'noshared'}" + ("-singlekv" if c.get("single_kv_proj") else "")


def _fla_model(case: dict, seed: int = 0):
    """A tiny fla MomForCausalLM (vocab 97, D 32, 2 layers, H 2, K 16, E 4) in eval mode, its norm
    weights moved off 1 (a dropped weight shows), and a float32 copy of its state_dict."""
    cfg = fla_models.MomConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=16,
                               expand_v=1, num_memories=4, hidden_ratio=2, fuse_cross_entropy=False, **case)
    torch.manual_seed(seed)
    model = fla_models.MomForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and torch.all(p == 1):
                p.uniform_(0.5, 1.5)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _references(model, state):
    """momtune's reference LM of the same config and weights (loaded strictly), in float32 and float64."""
    ref32 = momtune.reference.MoMForCausalLM(as_config(model.config)).eval()
    ref32.load_state_dict(state, strict=True)
    return ref32, copy.deepcopy(ref32).double()


def _ragged(seed: int = 1, B: int = 3, T: int = 9):
    """Prompts of lengths T, T-3, T-5, left-padded (mask 0), ids in 1..96."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids, mask


def _bound(out32: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """FACTOR x the reference's own float32 error (norm-wise, element-wise), floored."""
    n, e = errors(out32.double(), want)
    return FACTOR * max(n, FLOOR32), FACTOR * max(e, FLOOR32)


def _assert_within(name: str, got: torch.Tensor, want: torch.Tensor, ref32: torch.Tensor) -> None:
    bn, be = _bound(ref32, want)
    n, e = errors(got.double(), want)
    assert n <= bn and e <= be, (f"{name}: norm-wise {n:.3e} (bound {bn:.3e}), element-wise {e:.3e} "
                                 f"(bound {be:.3e}); the float32 reference: {bn / FACTOR:.3e}, {be / FACTOR:.3e}")


def _spy(monkeypatch) -> dict[str, int]:
    """Counts the momtune kernel paths the applied model takes (so a silent fallback would fail)."""
    import momtune.kernels.norm as norm_mod
    import momtune.kernels.swiglu as swiglu_mod

    calls = dict(prefill=0, decode=0, norm=0, swiglu=0)

    def counting(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(FlaMoMAttention, "_prefill", counting("prefill", momtune.MoMAttention._prefill))
    monkeypatch.setattr(FlaMoMAttention, "_decode", counting("decode", momtune.MoMAttention._decode))
    monkeypatch.setattr(norm_mod, "add_rms_norm", counting("norm", norm_mod.add_rms_norm))
    monkeypatch.setattr(swiglu_mod, "swiglu", counting("swiglu", swiglu_mod.swiglu))
    return calls


# ---------------------------------------------------------------- the swap itself (no kernels run)
@pytest.mark.parametrize("case", CASES + [dict(topk=2, shared_mem=True, single_kv_proj=True)], ids=_cid)
def test_apply_swaps_in_place_keeping_weights_and_is_idempotent(case):
    model, state = _fla_model(case)
    params = {name: p for name, p in model.named_parameters()}
    got, summary = momtune.apply(model, backend="reference")
    assert got is model
    assert summary.swapped == {"MomAttention": 2, "RMSNorm": 5, "GatedMLP": 2} and not summary.skipped, str(summary)
    for block in model.model.layers:
        assert isinstance(block.attn, FlaMoMAttention) and isinstance(block.mlp, FlaGatedMLP)
        assert isinstance(block.attn_norm, FlaRMSNorm) and isinstance(block.mlp_norm, FlaRMSNorm)
        assert block.attn.backend == "reference"
    assert isinstance(model.model.norm, FlaRMSNorm)
    # the same Parameter objects under the same names (an optimizer made before apply still trains them)
    assert {name: id(p) for name, p in model.named_parameters()} == {name: id(p) for name, p in params.items()}
    after = model.state_dict()
    assert list(after) == list(state)
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    modules = [(n, id(m)) for n, m in model.named_modules()]
    again, summary2 = momtune.apply(model, backend="auto")
    assert again is model and [(n, id(m)) for n, m in model.named_modules()] == modules
    assert summary2.swapped == {"MomAttention": 0, "RMSNorm": 0, "GatedMLP": 0}
    assert summary2.already == {"MomAttention": 2, "RMSNorm": 5, "GatedMLP": 2}
    assert all(m.backend == "auto" for m in model.modules() if isinstance(m, (FlaMoMAttention, FlaRMSNorm, FlaGatedMLP)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_apply_refuses_what_is_not_a_module():
    with pytest.raises(InputError, match="model: expected a torch.nn.Module"):
        momtune.apply("path/to/model")
    with pytest.raises(InputError, match="model: expected a torch.nn.Module"):
        momtune.apply(None)
    with pytest.raises(InputError, match="backend: 'fast' is not accepted"):
        momtune.apply(nn.Linear(2, 2), backend="fast")


def test_unknown_and_unsupported_modules_are_left_alone():
    kw = dict(hidden_size=32, head_dim=16, num_heads=2, num_memories=4, topk=2, layer_idx=0)
    ungated = fla_layers.MomAttention(**kw, use_output_gate=False)  # o_norm is a plain RMSNorm: unsupported
    biased = fla_modules.RMSNorm(32, bias=True)
    powlu = fla_modules.GatedMLP(32, hidden_ratio=2, hidden_act="powlu")
    shared = fla_modules.RMSNorm(32)
    linear = nn.Linear(32, 32)
    tree = nn.ModuleDict(dict(ungated=ungated, biased=biased, powlu=powlu, linear=linear, first=shared,
                              second=shared, ours=momtune.MoMAttention(**kw, backend="reference")))
    sd = {k: v.clone() for k, v in tree.state_dict().items()}
    _, summary = momtune.apply(tree)
    assert tree["ungated"] is ungated and tree["biased"] is biased and tree["powlu"] is powlu
    assert tree["linear"] is linear and type(tree["ours"]) is momtune.MoMAttention
    assert set(summary.skipped) == {"ungated", "biased", "powlu"}, str(summary)
    assert "use_output_gate" in summary.skipped["ungated"] and "swish" in summary.skipped["powlu"]
    assert isinstance(tree["first"], FlaRMSNorm) and tree["first"] is tree["second"]  # one module, one replacement
    assert isinstance(ungated.o_norm, FlaRMSNorm)  # inside a module left alone, what it knows is swapped
    assert summary.swapped == {"MomAttention": 0, "RMSNorm": 2, "GatedMLP": 0}
    assert all(torch.equal(v, sd[k]) for k, v in tree.state_dict().items())


# ---------------------------------------------------------------- the applied model's numbers
@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_applied_fla_model_matches_the_reference_on_ragged_input(case, monkeypatch):
    """Logits and router logits of fla's MomForCausalLM after apply (kernels, float32) against momtune's
    float64 reference LM on left-padded prompts; the aux loss from fla's own code matches too."""
    model, state = _fla_model(case, seed=3)
    ref32, ref64 = _references(model, state)
    momtune.apply(model, backend="triton")
    calls = _spy(monkeypatch)
    ids, mask = _ragged()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
        want, want32 = ref64(ids, attention_mask=mask, labels=labels), ref32(ids, attention_mask=mask, labels=labels)
    assert calls == dict(prefill=2, decode=0, norm=5, swiglu=2), calls  # every block on the kernels
    _assert_within("logits", out.logits, want.logits, want32.logits)
    assert len(out.router_logits) == 2
    for i, (r, w, w32) in enumerate(zip(out.router_logits, want.router_logits, want32.router_logits)):
        assert r.shape == (ids.numel(), 4), r.shape  # [B*T, E]: the format fla's load_balancing_loss_func takes
        _assert_within(f"router logits {i}", r, w, w32)
    assert abs(out.aux_loss.item() - want.aux_loss.item()) <= 1e-5 * abs(want.aux_loss.item())
    assert abs(out.loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())


@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_hf_generate_on_the_applied_model_matches_the_reference(case, monkeypatch):
    """transformers' greedy generate (use_cache) on fla's model after apply: prefill, then decode
    steps on momtune's decode kernels through fla's Cache; the same tokens and scores as momtune's
    reference LM's generate in float64."""
    model, state = _fla_model(case, seed=4)
    ref32, ref64 = _references(model, state)
    momtune.apply(model)
    calls = _spy(monkeypatch)
    ids, mask = _ragged(seed=2)
    n = 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=True,
                             return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    want = ref64.generate(ids, n, attention_mask=mask, return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    want32 = ref32.generate(ids, n, attention_mask=mask, return_dict_in_generate=True, output_scores=True,
                            pad_token_id=0)
    assert calls["prefill"] == 2 and calls["decode"] == 2 * (n - 1), calls
    assert torch.equal(out.sequences, want.sequences), (out.sequences, want.sequences)
    assert len(out.scores) == len(want.scores) == n
    for step, (s, w, w32) in enumerate(zip(out.scores, want.scores, want32.scores)):
        _assert_within(f"scores at step {step}", s, w, w32)


@needs_kernels
def test_the_cache_is_fla_cache_holding_momtune_state(monkeypatch):
    """After a prefill and a decode step through fla's MomForCausalLM, fla's Cache holds each layer's
    state and conv windows in momtune's layout (batch first), equal to the reference's MoMCache,
    and counts the tokens; an entry written by fla's own layer is refused, not misread."""
    model, state = _fla_model(CASES[0], seed=5)
    ref32, ref64 = _references(model, state)
    momtune.apply(model)
    ids, mask = _ragged(seed=6)
    B, T = ids.shape
    nxt = torch.tensor([[5], [7], [11]])
    caches = {"ref64": momtune.reference.MoMCache(), "ref32": momtune.reference.MoMCache()}
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        assert type(cache) is Cache and cache.get_seq_length() == T
        out = model(nxt, attention_mask=torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1),
                    past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache and cache.get_seq_length() == T + 1
        for name, ref in (("ref64", ref64), ("ref32", ref32)):
            ref(ids, attention_mask=mask, past_key_values=caches[name])
            last = ref(nxt, past_key_values=caches[name]).logits
            if name == "ref64":
                want_logits = last
            else:
                last32 = last
    _assert_within("decode-step logits", out.logits, want_logits, last32)
    for i in range(2):
        entry = cache[i]
        (st,), (cq, ck, cv) = entry["recurrent_state"], entry["conv_state"]
        assert st.shape == (B, 5, 2, 16, 16) and st.dtype == torch.float32  # [B, M = E + shared, H, K, V]
        assert cq.shape == ck.shape == cv.shape == (B, 5, 3, 32)  # [B, M, W - 1, H*K]
        w, w32 = caches["ref64"].layers[i], caches["ref32"].layers[i]
        for n_, got, want_, want32 in (("state", st, w.state, w32.state), ("conv_q", cq, w.conv_q, w32.conv_q),
                                       ("conv_k", ck, w.conv_k, w32.conv_k), ("conv_v", cv, w.conv_v, w32.conv_v)):
            _assert_within(f"layer {i} {n_}", got, want_, want32)

    foreign = Cache()  # fla's own layout: [E*B, H, V, K] routed + [B, H, V, K] shared, conv [N, C, W]
    foreign.update(recurrent_state=[torch.zeros(4 * B, 2, 16, 16), torch.zeros(B, 2, 16, 16)],
                   conv_state=tuple([torch.zeros(4 * B, 32, 4), torch.zeros(B, 32, 4)] for _ in range(3)),
                   layer_idx=0, offset=T)
    with pytest.raises(InputError, match="written by fla's own MomAttention"), torch.no_grad():
        model(nxt, past_key_values=foreign, use_cache=True)


@needs_kernels
def test_a_bare_fla_layer_keeps_fla_call_signature_and_packed_input():
    """apply() on a bare fla MomAttention returns its replacement; it is called as fla's (4 outputs)
    and takes fla's cu_seqlens (packed sequences), equal to the reference per sequence."""
    kw = dict(hidden_size=32, head_dim=16, num_heads=2, expand_v=1, num_memories=4, topk=2, shared_mem=True,
              layer_idx=0)
    torch.manual_seed(7)
    fla = fla_layers.MomAttention(**kw).eval()
    ref = momtune.reference.MoMAttention(**kw).double().eval()
    ref.load_state_dict({k: v.double() for k, v in fla.state_dict().items()}, strict=True)
    ref32 = copy.deepcopy(ref).float()
    layer, summary = momtune.apply(fla)
    assert isinstance(layer, FlaMoMAttention) and summary.swapped["MomAttention"] == 1
    assert {n: id(p) for n, p in layer.named_parameters()} == {n: id(p) for n, p in fla.named_parameters()}
    lens = [5, 3]
    x = torch.randn(1, sum(lens), 32)
    cu = torch.tensor([0, 5, 8])
    with torch.no_grad():
        o, attn, past, logits = layer(x, cu_seqlens=cu, position_ids=torch.arange(8)[None])  # extra kwargs ignored
        assert attn is None and past is None and o.shape == (1, 8, 32) and logits.shape == (8, 4)
        want = [ref(x[:, a:b].double()) for a, b in ((0, 5), (5, 8))]
        want32 = [ref32(x[:, a:b]) for a, b in ((0, 5), (5, 8))]
    _assert_within("packed output", o[0], torch.cat([w[0][0] for w in want]), torch.cat([w[0][0] for w in want32]))
    _assert_within("packed router logits", logits, torch.cat([w[1] for w in want]), torch.cat([w[1] for w in want32]))


# ---------------------------------------------------------------- training
def test_a_training_step_matches_the_reference_gradients(monkeypatch):
    """Under autograd with a padding mask, backend 'auto' runs the attention, the norms and
    SwiGLU on their forward and backward kernels (issue 14; the recurrence's backward on the
    chunked reference): fla's
    own loss (cross-entropy + aux loss from the router logits) and every gradient match momtune's
    reference LM, within FACTOR x the reference's own float32 error."""
    from momtune.kernels.norm import backward as norm_bwd
    from momtune.kernels.swiglu import backward as swiglu_bwd

    calls = []
    for mod, name in ((norm_bwd, "rms_norm_backward"), (swiglu_bwd, "swiglu_backward")):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _name=name, **k: (calls.append(_name), _fn(*a, **k))[1])
    model, state = _fla_model(CASES[0], seed=8)
    ref32, ref64 = _references(model, state)
    momtune.apply(model)
    model.train()
    ids, mask = _ragged(seed=9)
    labels = ids.masked_fill(mask == 0, -100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    L = model.config.num_hidden_layers
    assert calls.count("rms_norm_backward") == 2 * L + 1 and calls.count("swiglu_backward") == L, calls
    losses = {}
    for name, ref in (("ref64", ref64), ("ref32", ref32)):
        r = ref(ids, attention_mask=mask, labels=labels)
        r.loss.backward()
        losses[name] = r
    want, want32 = losses["ref64"], losses["ref32"]
    _assert_within("loss", out.loss.detach()[None], want.loss.detach()[None], want32.loss.detach()[None])
    _assert_within("aux loss", out.aux_loss.detach()[None], want.aux_loss.detach()[None], want32.aux_loss.detach()[None])
    g64, g32 = dict(ref64.named_parameters()), dict(ref32.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert all(p.grad is not None for p in model.parameters())
    flat = lambda ps: torch.cat([ps[n].grad.flatten().double() for n in names])  # noqa: E731
    _assert_within("gradients", flat(dict(model.named_parameters())), flat(g64), flat(g32))


# ---------------------------------------------------------------- GPU: against fla itself
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_applied_matches_fla_in_bf16_and_times_a_token():
    """mom-340m shapes (24 layers, random init) in bf16 on the GPU: fla's model before and after
    apply. Logits at real tokens of a left-padded batch (T <= 64: fla's fused_recurrent path), both
    against momtune's float64 reference: the applied model within max(FACTOR x the reference's own
    bf16 error, 1.5 x fla's). Greedy tokens (fla: its cached forward, step by step; applied: HF
    generate) may part only at a near-tie of the float64 reference. Prints time per token."""
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    cfg = fla_models.MomConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_heads=4, head_dim=256,
                               expand_v=1, num_memories=4, topk=2, shared_mem=True, hidden_ratio=3)
    fla = fla_models.MomForCausalLM(cfg).to(dev, bf).eval()
    state = fla.state_dict()
    refs = {}
    for name, dt in (("ref64", torch.float64), ("refbf", bf)):
        refs[name] = momtune.reference.MoMForCausalLM(as_config(cfg)).eval()
        refs[name].load_state_dict(state, strict=True)
        refs[name].to(dev, dt)
    applied = copy.deepcopy(fla)
    _, summary = momtune.apply(applied)
    assert summary.swapped == {"MomAttention": 24, "RMSNorm": 49, "GatedMLP": 24}, str(summary)

    g = torch.Generator().manual_seed(1)
    B, T = 4, 48
    ids = torch.randint(1, 32000, (B, T), generator=g).to(dev)
    mask = torch.ones(B, T, dtype=torch.long, device=dev)
    for row, pad in enumerate((0, 8, 19, 31)):
        mask[row, :pad] = 0
    real = mask.bool()
    with torch.no_grad():
        logits = {"fla": fla(ids, attention_mask=mask).logits, "applied": applied(ids, attention_mask=mask).logits}
        for name, ref in refs.items():
            logits[name] = ref(ids, attention_mask=mask).logits
    want = logits["ref64"][real]
    rel = {k: errors(v[real].double(), want)[0] for k, v in logits.items() if k != "ref64"}
    absmax = {k: (v[real].double() - want).abs().max().item() for k, v in logits.items() if k != "ref64"}
    print(f"\nlogits vs float64 reference, norm-wise: fla {rel['fla']:.3e}, applied {rel['applied']:.3e}, "
          f"reference in bf16 {rel['refbf']:.3e}; max abs: {absmax}")
    assert rel["applied"] <= max(FACTOR * rel["refbf"], 1.5 * rel["fla"]), rel
    d = logits["applied"][real].double() - logits["fla"][real].double()
    print(f"applied vs fla: norm-wise {d.norm().item() / logits['fla'][real].double().norm().item():.3e}")

    # greedy: fla step by step on its own cache; the applied model through transformers' generate
    n = 16
    with torch.no_grad():
        toks = _greedy_loop(fla, ids, mask, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = applied.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=True,
                                   pad_token_id=0)[:, T:]
            fla_gen = fla.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=True,
                                   pad_token_id=0)[:, T:]
    import transformers
    print(f"greedy tokens equal: applied generate vs fla's loop {torch.equal(gen, toks)}; fla's own generate vs "
          f"its loop {torch.equal(fla_gen, toks)} (transformers {transformers.__version__})")
    tie = FACTOR * max(absmax["refbf"], absmax["fla"])  # a split needs a float64 margin a bf16 model can't resolve
    for row in range(B):
        stop = (toks[row] == cfg.eos_token_id).nonzero()  # generate stops a row at EOS; the loop does not
        end = int(stop[0]) + 1 if stop.numel() else n
        diff = (gen[row, :end] != toks[row, :end]).nonzero()
        if diff.numel():
            k = int(diff[0])
            prefix = torch.cat([ids[row], toks[row, :k]])[None]
            m = torch.cat([mask[row], torch.ones(k, dtype=mask.dtype, device=dev)])[None]
            with torch.no_grad():
                last = refs["ref64"](prefix, attention_mask=m).logits[0, -1]
            margin = (last[gen[row, k]] - last[toks[row, k]]).abs().item()
            print(f"row {row}: tokens part at step {k}, float64 margin {margin:.3e} (tie bound {tie:.3e})")
            assert margin <= tie, (row, k, margin, tie)

    # time per token, B = 1, eager (fla's code calls the layers; no CUDA graph)
    p = ids[:1, :32]
    ms = {}
    for name, m in (("fla", fla), ("applied", applied)):
        with torch.no_grad():
            _greedy_loop(m, p, None, 4)  # warm-up: fla autotunes, Triton compiles
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _greedy_loop(m, p, None, 65)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            _greedy_loop(m, p, None, 1)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
        ms[name] = ((t1 - t0) - (t2 - t1)) / 64 * 1e3  # the prefill's time taken out
    print(f"decode, B 1, mom-340m bf16: fla {ms['fla']:.2f} ms/token, after momtune.apply {ms['applied']:.2f} "
          f"ms/token ({ms['fla'] / ms['applied']:.2f}x)")


def _greedy_loop(model, ids, mask, n):
    """n greedy tokens from ``model`` over fla's Cache passed as past_key_values (prefill, then steps)."""
    out = model(ids, attention_mask=mask, use_cache=True)
    cache, toks = out.past_key_values, []
    am = mask
    for _ in range(n):
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
        if len(toks) == n:
            break
        if am is not None:
            am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        out = model(tok, attention_mask=am, past_key_values=cache, use_cache=True)
    return torch.cat(toks, 1)
