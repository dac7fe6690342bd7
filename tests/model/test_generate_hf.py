"""``generate`` with transformers' keywords (issue 13, item 3): greedy and sampling as the reference,
per-row EOS and padding, max_length / max_new_tokens, top-p, return_dict_in_generate, indexing,
clear errors for unknown keywords and bad values, the host reading the device's "all finished"
flag only every k steps, and (with transformers installed) the same tokens as its GenerationMixin.

The fast model runs in Triton's interpreter (TRITON_INTERPRET=1; ~1.4 s a decode step on the tiny
preset), so it decodes in two tests only; the semantics shared by both classes are checked on the
reference, which runs the same loop (:mod:`momtune.reference.generate`).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import momtune
from momtune.errors import InputError
from momtune.reference import generate as gen
from tests.helpers import assert_close

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_kernels = pytest.mark.skipif(not INTERP and not torch.cuda.is_available(),
                                   reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V = 97  # the tiny preset's vocabulary


def _models(seed: int = 0, backend: str = "triton", **overrides):
    cfg = momtune.MoMConfig.from_preset("tiny", **overrides)
    torch.manual_seed(seed)
    fast = momtune.MoMForCausalLM(cfg, backend=backend).to(DEVICE).eval()
    with torch.no_grad():
        for block in fast.model.layers:  # routing that varies from token to token
            block.attn.gate.weight.normal_(0, 0.5)
        for p in fast.parameters():  # norm weights away from 1
            if p.dim() == 1 and torch.all(p == 1):
                p.uniform_(0.5, 1.5)
    ref = momtune.reference.MoMForCausalLM(cfg).to(DEVICE).eval()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.fixture(scope="module")
def pair():
    return _models()


@pytest.fixture(scope="module")
def ref(pair):
    return pair[1]


def _prompts(B: int = 3, T: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (row 1 has 2 padding tokens) and their attention mask."""
    ids = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def _expected_with_eos(greedy: torch.Tensor, T: int, eos: set[int], pad: int) -> torch.Tensor:
    """The greedy continuation cut per row after its first EOS (then ``pad``), and cut for all rows
    at the step where the last row finished (as transformers)."""
    new = greedy[:, T:].clone()
    ends = []
    for b in range(new.shape[0]):
        hits = [j for j, t in enumerate(new[b].tolist()) if t in eos]
        end = hits[0] + 1 if hits else new.shape[1]
        new[b, end:] = pad
        ends.append(end)
    return torch.cat([greedy[:, :T], new[:, :max(ends)]], dim=1)


# ------------------------------------------------------------------ the fast model (interpreter)
@needs_kernels
def test_fast_greedy_with_eos_padding_and_mask_equals_reference(pair):
    """One EOS id per row, taken from the greedy output itself, so every row stops at a known step:
    the fast and reference outputs equal the greedy tokens cut there and padded, and are shorter
    than max_new_tokens (every row finished); the scores are the logits (greedy)."""
    fast, ref = pair
    ids, mask = _prompts()
    T, n = ids.shape[1], 8
    greedy = ref.generate(ids, n, attention_mask=mask)
    eos = [int(greedy[0, T + 1]), int(greedy[1, T + 2]), int(greedy[2, T + 3])]
    want = _expected_with_eos(greedy, T, set(eos), pad=0)
    assert want.shape[1] < T + n, "every row finishes before max_new_tokens"
    kw = dict(max_new_tokens=n, attention_mask=mask, eos_token_id=eos, pad_token_id=0,
              return_dict_in_generate=True, output_scores=True)
    r, f = ref.generate(ids, **kw), fast.generate(ids, **kw)
    assert torch.equal(r.sequences, want)
    assert torch.equal(f.sequences, want)
    assert len(f.scores) == len(r.scores) == want.shape[1] - T
    for i, (a, b) in enumerate(zip(f.scores, r.scores)):
        assert a.dtype == torch.float32 and a.shape == (3, V)
        assert_close(f"scores[{i}]", a, b, 2e-3, 2e-3)
    assert torch.equal(torch.stack(r.scores, 1).argmax(-1)[:, :2], want[:, T:T + 2])


@needs_kernels
def test_fast_sampling_equals_reference_with_the_same_generator(pair):
    """temperature, top_k and top_p with a seeded generator: the same draws on both classes."""
    fast, ref = pair
    ids, mask = _prompts(B=2, T=4, seed=2)
    kw = dict(max_new_tokens=4, attention_mask=mask, do_sample=True, temperature=0.8, top_k=30, top_p=0.9)
    got = fast.generate(ids, **kw, generator=torch.Generator(DEVICE).manual_seed(7))
    want = ref.generate(ids, **kw, generator=torch.Generator(DEVICE).manual_seed(7))
    assert torch.equal(got, want)


def test_fast_loop_reads_the_flag_every_16_steps_and_the_reference_every_step():
    assert momtune.MoMForCausalLM.generate_sync_every == 16
    assert momtune.reference.MoMForCausalLM.generate_sync_every == 1
    assert momtune.MoMForCausalLM.generate_extras == {"cuda_graph": True}


# ------------------------------------------------------------------ the decode loop, on a scripted model
class _Scripted:
    """A stand-in LM whose row b emits token ``script[b][i]`` at step i (one-hot logits)."""

    class config:  # noqa: N801 - mimics model.config
        vocab_size, eos_token_id, pad_token_id = 10, None, None

    def __init__(self, script: list[list[int]]) -> None:
        self.script, self.i, self.steps = torch.tensor(script), 0, 0

    def _check_ids(self, name, ids):
        pass

    def logits(self) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.script[:, self.i], 10).float()

    def start(self) -> torch.Tensor:
        self.i = 0
        return self.logits()

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        assert torch.equal(ids[:, 0], self.fed[:, self.i]), "each step is fed the last token (pad once finished)"
        self.i, self.steps = self.i + 1, self.steps + 1
        return self.logits()


@pytest.mark.parametrize("sync_every", [1, 4, 16], ids=lambda k: f"sync{k}")
def test_loop_syncs_every_k_steps_stops_early_and_cuts_where_the_last_row_finished(monkeypatch, sync_every):
    """Row 0 emits EOS (9) at step 1, row 1 at step 5, of 20: every k reads the flag only every k
    steps (counted), stops at the first read after step 5, and all return the same 6 tokens."""
    script = [[1, 9, 2, 3, 4, 5] + [6] * 14, [1, 2, 3, 4, 5, 9] + [7] * 14]
    model = _Scripted(script)
    model.fed = torch.tensor([[1, 9, 0, 0, 0, 0] + [0] * 14, [1, 2, 3, 4, 5, 9] + [0] * 14])
    reads = []
    monkeypatch.setattr(gen, "all_finished", lambda flag: reads.append(bool(flag)) or bool(flag))
    ids = torch.tensor([[3, 4], [5, 6]])
    ids_, args = gen.parse(model, ids, 20, dict(eos_token_id=9, pad_token_id=0))
    out = gen.run(ids_, args, model.start, model.step, sync_every)
    assert torch.equal(out, torch.tensor([[3, 4, 1, 9, 0, 0, 0, 0], [5, 6, 1, 2, 3, 4, 5, 9]]))
    stop = -(-6 // sync_every) * sync_every  # the first multiple of k at or after step 6
    assert len(reads) == stop // sync_every and reads[-1] and not any(reads[:-1])
    assert model.steps == stop - 1


def test_loop_without_eos_never_reads_the_flag(monkeypatch):
    reads = []
    monkeypatch.setattr(gen, "all_finished", lambda flag: reads.append(flag) or bool(flag))
    model = _Scripted([[1] * 6])
    model.fed = torch.tensor([[1] * 6])
    ids_, args = gen.parse(model, torch.tensor([[2]]), 6, {})
    assert gen.run(ids_, args, model.start, model.step, 1).shape == (1, 7) and reads == []


# ------------------------------------------------------------------ lengths, EOS defaults
def test_max_length_and_max_new_tokens(ref):
    ids, _ = _prompts()
    T = ids.shape[1]
    four = ref.generate(ids, max_new_tokens=4)
    assert four.shape == (3, T + 4)
    assert torch.equal(ref.generate(ids, max_length=T + 4), four)
    assert torch.equal(ref.generate(ids, max_length=T + 2, max_new_tokens=4), four), "max_new_tokens wins"
    assert torch.equal(ref.generate(ids, max_length=T), ids)
    assert torch.equal(ref.generate(ids, 0), ids)
    assert torch.equal(ref.generate(inputs=ids, max_new_tokens=4), four)  # transformers' name
    with pytest.raises(InputError, match="max_new_tokens.*max_length"):
        ref.generate(ids)
    with pytest.raises(InputError, match=r"max_length: 3 is shorter than the prompt \(5 tokens\)"):
        ref.generate(ids, max_length=3)


def test_eos_and_pad_defaults_come_from_the_config():
    """eos_token_id from the config stops rows; pad_token_id defaults to the first EOS id (as HF)."""
    _, ref = _models(backend="reference")
    ids, _ = _prompts()
    T = ids.shape[1]
    greedy = ref.generate(ids, 6)
    eos = int(greedy[0, T + 1])
    want = _expected_with_eos(greedy, T, {eos}, pad=eos)
    ref.config.eos_token_id = eos
    try:
        assert torch.equal(ref.generate(ids, 6), want)
        assert torch.equal(ref.generate(ids, 6, eos_token_id=[eos]), want)
        ref.config.pad_token_id = 5
        assert torch.equal(ref.generate(ids, 6), _expected_with_eos(greedy, T, {eos}, pad=5))
        ref.config.eos_token_id = 500
        with pytest.raises(InputError, match=r"eos_token_id \(the config's default\): 500 is outside"):
            ref.generate(ids, 2)
    finally:
        ref.config.eos_token_id = ref.config.pad_token_id = None


# ------------------------------------------------------------------ sampling
def test_top_p_one_is_plain_sampling_and_a_tiny_top_p_is_greedy(ref):
    ids, mask = _prompts()
    kw = dict(max_new_tokens=6, attention_mask=mask, do_sample=True, temperature=1.3)

    def draw(**more):
        return ref.generate(ids, **kw, **more, generator=torch.Generator(DEVICE).manual_seed(11))
    plain = draw()
    assert torch.equal(draw(top_p=1.0), plain)
    greedy = ref.generate(ids, 6, attention_mask=mask)
    assert not torch.equal(plain, greedy), "temperature 1.3 sampling must differ from greedy here"
    assert torch.equal(draw(top_p=1e-6), greedy)
    assert torch.equal(draw(top_k=1), greedy)


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_top_p_keeps_the_smallest_nucleus(ref, top_p):
    """Each step's processed scores keep exactly the smallest set of most likely tokens whose
    probability reaches top_p (after temperature), and the drawn token is in it."""
    ids, _ = _prompts()
    out = ref.generate(ids, 5, do_sample=True, temperature=2.0, top_p=top_p, return_dict_in_generate=True,
                       output_scores=True, output_logits=True, generator=torch.Generator(DEVICE).manual_seed(3))
    T = ids.shape[1]
    for i, (s, raw) in enumerate(zip(out.scores, out.logits)):
        p = torch.softmax(raw / 2.0, dim=-1)
        kept = torch.isfinite(s)
        for b in range(3):
            mass = p[b][kept[b]].sum()
            smallest = p[b][kept[b]].min()
            assert mass >= top_p - 1e-6 and mass - smallest < top_p, (i, b, mass, smallest)
            assert kept[b, out.sequences[b, T + i]]
            assert torch.all(p[b][~kept[b]] <= smallest)


# ------------------------------------------------------------------ outputs
def test_return_dict_and_indexing_as_transformers(ref):
    ids, _ = _prompts()
    T = ids.shape[1]
    plain = ref.generate(ids, 3)
    assert isinstance(plain, torch.Tensor) and plain[0].shape == (T + 3,)  # out[0]: the first sequence
    out = ref.generate(ids, 3, return_dict_in_generate=True)
    assert isinstance(out, gen.GenerateOutput)
    assert torch.equal(out.sequences, plain) and out["sequences"] is out.sequences and out[0] is out.sequences
    assert out.scores is None and "scores" not in out and out.keys() == ["sequences"] and len(out) == 1
    with pytest.raises(KeyError, match="scores"):
        out["scores"]
    full = ref.generate(ids, 3, return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert list(full) == ["sequences", "scores", "logits"] and full[1] is full.scores and full["logits"] is full.logits
    assert len(full.scores) == 3 and all(s.shape == (3, V) and s.dtype == torch.float32 for s in full.scores)
    with torch.no_grad():  # the raw logits are the model's at each generated position
        logits = ref(plain[:, :-1]).logits[:, T - 1:]
    for i, raw in enumerate(full.logits):
        assert_close(f"logits[{i}]", raw, logits[:, i], 1e-5, 1e-4)
        assert torch.equal(raw.argmax(-1), plain[:, T + i])


# ------------------------------------------------------------------ errors
def test_unknown_keywords_are_named_with_the_accepted_ones(ref):
    ids, _ = _prompts()
    with pytest.raises(InputError) as info:
        ref.generate(ids, 3, num_beam=2, streamer=None)
    msg = str(info.value)
    assert "num_beam, streamer" in msg and "accepted:" in msg
    assert all(k in msg for k in ("max_new_tokens", "top_p", "eos_token_id", "return_dict_in_generate"))
    with pytest.raises(InputError, match="cuda_graph"):  # the fast class's keyword, listed there
        ref.generate(ids, 3, cuda_graph=False)
    with pytest.raises(InputError) as info:
        momtune.MoMForCausalLM(ref.config, backend="reference").generate(ids, 3, repetition_penalty=1.2)
    assert "repetition_penalty" in str(info.value) and "cuda_graph" in str(info.value)
    # transformers' keywords at their no-op values are accepted; other values are named
    assert torch.equal(ref.generate(ids, 2, num_beams=1, num_return_sequences=1, use_cache=True), ref.generate(ids, 2))
    with pytest.raises(InputError, match="num_beams: 4 is not supported"):
        ref.generate(ids, 2, num_beams=4)


BAD = [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=None, max_length=0), "max_length"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, temperature=float("inf")), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(do_sample=True, top_k=0), r"top_k: 0 is not accepted; give None"),
    (dict(top_k=V + 1), "top_k"),
    (dict(eos_token_id=V), rf"eos_token_id: {V} is outside the vocabulary 0..{V - 1}"),
    (dict(eos_token_id=[3, 200]), "eos_token_id: 200 is outside"),
    (dict(eos_token_id=[]), "eos_token_id"),
    (dict(eos_token_id=2.0), "eos_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(pad_token_id=[1, 2]), "pad_token_id"),
    (dict(do_sample="yes"), "do_sample"),
    (dict(return_dict_in_generate=1), "return_dict_in_generate"),
    (dict(attention_mask=torch.ones(3, 4)), "attention_mask"),
    (dict(generator=7), "generator"),
    (dict(num_return_sequences=2), "num_return_sequences"),
]


def _bad_id(kw: dict) -> str:
    name, value = list(kw.items())[-1]
    return f"{name}-{type(value).__name__ if isinstance(value, torch.Tensor) else value}"


@pytest.mark.parametrize("kw,says", BAD, ids=[_bad_id(k) for k, _ in BAD])
@pytest.mark.parametrize("cls", ["reference", "fast"])
def test_bad_values_name_the_argument(ref, kw, says, cls):
    model = ref if cls == "reference" else momtune.MoMForCausalLM(ref.config, backend="triton")
    ids, _ = _prompts()
    kw = {"max_new_tokens": 3, **kw}
    with pytest.raises(InputError, match=says):
        model.generate(ids, **kw)


def test_greedy_ignores_sampling_only_values_as_transformers(ref):
    ids, _ = _prompts()
    assert torch.equal(ref.generate(ids, 3, temperature=0.0, top_p=0.5, top_k=3), ref.generate(ids, 3))


# ------------------------------------------------------------------ transformers' GenerationMixin
def _hf_wrapper(lm):
    """``lm`` behind a transformers PreTrainedModel + GenerationMixin (no cache: the whole sequence
    each step, with the attention mask transformers grows), to run its own generate loop."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers = pytest.importorskip("transformers")
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class Cfg(transformers.PreTrainedConfig):
        model_type = "momtune-test-wrapper"

    class Wrapper(transformers.PreTrainedModel, transformers.GenerationMixin):
        config_class = Cfg

        def __init__(self, config, lm):
            super().__init__(config)
            self.lm = lm

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return CausalLMOutputWithPast(logits=self.lm(input_ids, attention_mask=attention_mask).logits)

    return Wrapper(Cfg(vocab_size=V), lm).eval()


def test_same_tokens_as_transformers_generate(ref):
    """Greedy with EOS, padding, left-padded prompts and max_length; and seeded sampling with
    temperature, top_k and top_p (both draw from torch's global generator): the same tokens and
    scores as transformers' GenerationMixin on the same model."""
    hf = _hf_wrapper(ref)
    ids, mask = _prompts()
    T = ids.shape[1]
    greedy = ref.generate(ids, 8, attention_mask=mask)
    eos = [int(greedy[0, T + 2]), int(greedy[2, T + 4])]
    for kw in (dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=0),
               dict(max_length=T + 6, eos_token_id=eos[0], pad_token_id=3),
               dict(max_new_tokens=5, max_length=T + 2, eos_token_id=eos[1], pad_token_id=0)):
        ours = ref.generate(ids, attention_mask=mask, **kw, return_dict_in_generate=True, output_scores=True)
        theirs = hf.generate(ids, attention_mask=mask, **kw, do_sample=False, use_cache=False,
                             return_dict_in_generate=True, output_scores=True)
        assert torch.equal(ours.sequences, theirs.sequences), kw
        assert len(ours.scores) == len(theirs.scores)
        for a, b in zip(ours.scores, theirs.scores):
            assert_close("scores", a, b, 1e-5, 1e-4)
    kw = dict(max_new_tokens=6, attention_mask=mask, do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
              pad_token_id=0)
    torch.manual_seed(5)
    ours = ref.generate(ids, **kw)
    torch.manual_seed(5)
    theirs = hf.generate(ids, **kw, use_cache=False)
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------ CUDA graph (GPU)
def _count_syncs_after_prefill(model, monkeypatch) -> list[str]:
    """Turn on torch's sync debug mode ("warn") once the prompt is prefilled (and the graph
    captured); the returned list fills with the host syncs of the decode loop."""
    syncs: list[str] = []
    decoder = model._decoder

    def counted(input_ids, args):
        start, step = decoder(input_ids, args)

        def start_then_count():
            logits = start()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            return logits
        return start_then_count, step
    monkeypatch.setattr(model, "_decoder", counted)
    return syncs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_eos_equals_eager_and_syncs_only_every_16_steps(monkeypatch):
    """The graph loop with EOS: the same tokens as the eager loop and as the greedy tokens cut;
    with every row finished by step 4 of 64 it reads the flag once (after 16 steps), and the
    whole decode loop, greedy or sampling with top-p, makes a handful of host syncs, not 64."""
    fast, _ = _models(seed=3)
    ids, mask = _prompts()
    T = ids.shape[1]
    greedy = fast.generate(ids, 8, attention_mask=mask, cuda_graph=False)  # fast's own (tf32 near-ties)
    eos = [int(greedy[0, T + 1]), int(greedy[1, T + 2]), int(greedy[2, T + 3])]
    kw = dict(max_new_tokens=64, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    sampled = dict(kw, do_sample=True, top_p=0.9, temperature=0.8)
    eager = fast.generate(ids, **kw, cuda_graph=False)
    eager_sampled = fast.generate(ids, **sampled, generator=torch.Generator("cuda").manual_seed(1), cuda_graph=False)
    reads = []
    monkeypatch.setattr(gen, "all_finished", lambda flag: reads.append(bool(flag)) or bool(flag))
    _count_syncs_after_prefill(fast, monkeypatch)
    for run_kw, want in ((kw, eager), (sampled, eager_sampled)):
        reads.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                got = fast.generate(ids, **run_kw, generator=torch.Generator("cuda").manual_seed(1))
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        assert torch.equal(got, want)
        if run_kw is kw:
            assert torch.equal(got, _expected_with_eos(greedy, T, set(eos), pad=0))
            assert reads == [True]
        assert len(syncs) <= 8, syncs  # per-step syncs would be >= 63
