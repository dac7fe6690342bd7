"""The reference causal LM: fla state-dict names, loss / aux loss by hand, batching, input checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from momtune.errors import InputError
from momtune.reference.config import MoMConfig
from momtune.reference.model import MoMForCausalLM, load_balancing_loss
from tests.helpers import assert_close

# D 24, 2 layers, H 2, K 8, V 16 (expand_v 2), E 4, top-2, shared memory, SwiGLU width 256
CFG = dict(vocab_size=97, hidden_size=24, num_hidden_layers=2, num_heads=2, head_dim=8, expand_v=2.0,
           num_memories=4, topk=2, shared_mem=True, hidden_ratio=2)


def expected_fla_shapes() -> dict[str, tuple[int, ...]]:
    """fla 0.6.0 MomForCausalLM names for CFG, written out by hand."""
    want: dict[str, tuple[int, ...]] = {"model.embeddings.weight": (97, 24), "model.norm.weight": (24,),
                                        "lm_head.weight": (97, 24)}
    for i in range(2):
        p = f"model.layers.{i}."
        want[p + "attn_norm.weight"] = (24,)
        want[p + "mlp_norm.weight"] = (24,)
        want[p + "mlp.gate_proj.weight"] = (256, 24)
        want[p + "mlp.up_proj.weight"] = (256, 24)
        want[p + "mlp.down_proj.weight"] = (24, 256)
        a = p + "attn."
        want[a + "q_proj.weight"] = (16, 24)
        want[a + "gate.weight"] = (4, 24)
        for m in range(4):
            want[a + f"k_proj.{m}.weight"] = (16, 24)
            want[a + f"v_proj.{m}.weight"] = (32, 24)
            want[a + f"b_proj.{m}.weight"] = (2, 24)
            want[a + f"a_proj.{m}.weight"] = (2, 24)
        want[a + "shared_k.weight"] = (16, 24)
        want[a + "shared_v.weight"] = (32, 24)
        want[a + "shared_b.weight"] = (2, 24)
        want[a + "shared_a.weight"] = (2, 24)
        want[a + "A_log"] = (2,)
        want[a + "dt_bias"] = (2,)
        want[a + "q_conv1d.weight"] = (16, 1, 4)
        want[a + "k_conv1d.weight"] = (16, 1, 4)
        want[a + "v_conv1d.weight"] = (32, 1, 4)
        want[a + "g_proj.weight"] = (32, 24)
        want[a + "o_norm.weight"] = (16,)
        want[a + "o_proj.weight"] = (24, 32)
    return want


def _model(seed: int = 0, **kw) -> MoMForCausalLM:
    torch.manual_seed(seed)
    return MoMForCausalLM(MoMConfig(**{**CFG, **kw})).double().eval()


def test_state_dict_names_and_shapes_match_fla() -> None:
    model = _model()
    want = expected_fla_shapes()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(want), f"missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}"
    assert got == want
    assert len(want) == 3 + 2 * (5 + 2 + 4 * 4 + 4 + 2 + 3 + 3)


def test_fla_checkpoint_loads_strictly() -> None:
    model = _model()
    g = torch.Generator().manual_seed(1)
    ckpt = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in expected_fla_shapes().items()}
    result = model.load_state_dict(ckpt, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt[k]), k
    with pytest.raises(RuntimeError, match="k_proj.3"):  # a missing memory projection is reported
        model.load_state_dict({k: v for k, v in ckpt.items() if k != "model.layers.1.attn.k_proj.3.weight"})


def test_single_kv_proj_and_tied_embeddings() -> None:
    model = _model(single_kv_proj=True, shared_mem=False, tie_word_embeddings=True)
    names = set(model.state_dict())
    assert "model.layers.0.attn.shared_k.weight" in names
    assert not any(".k_proj." in n or ".v_proj." in n or ".b_proj." in n or ".a_proj." in n for n in names)
    assert model.lm_head.weight is model.model.embeddings.weight
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["model.embeddings.weight"].normal_()
    model.load_state_dict(sd, strict=True)  # a tied checkpoint may omit lm_head.weight
    assert torch.equal(model.lm_head.weight, sd["model.embeddings.weight"])
    ids = torch.randint(0, 97, (2, 7))
    assert torch.isfinite(model(ids).logits).all()


def test_aux_loss_by_hand() -> None:
    """2 layers x 3 tokens, E=3, top-2; logits = log p so softmax(logits) = p exactly."""
    p0 = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.1, 0.7]]  # layer 0: tops (0,1) (1,2) (2,0)
    p1 = [[0.6, 0.1, 0.3], [0.3, 0.5, 0.2], [0.25, 0.15, 0.6]]  # layer 1: tops (0,2) (1,0) (2,0)
    logits = (torch.tensor(p0, dtype=torch.float64).log(), torch.tensor(p1, dtype=torch.float64).log())
    # first choices: each expert twice -> 2/6; second choices: e0 three times, e1 once, e2 twice
    # mean p: e0 (0.5+0.1+0.2+0.6+0.3+0.25)/6 = 1.95/6, e1 1.75/6, e2 2.3/6
    expected = 3 * ((2 + 3) / 6 * 1.95 / 6 + (2 + 1) / 6 * 1.75 / 6 + (2 + 2) / 6 * 2.3 / 6)
    assert math.isclose(expected, 72.6 / 36, rel_tol=1e-12)
    got = load_balancing_loss(logits, num_experts=3, top_k=2)
    assert math.isclose(float(got), expected, rel_tol=1e-12), (float(got), expected)
    # uniform probabilities give exactly top_k, whichever experts the ties pick: E * sum_j sum_e f[j, e] / E
    uniform = (torch.zeros(4, 4, dtype=torch.float64),)
    assert math.isclose(float(load_balancing_loss(uniform, 4, 2)), 2.0, rel_tol=1e-12)


def test_loss_is_shifted_ce_plus_scaled_aux() -> None:
    model = _model(seed=2, aux_loss_scale=0.25)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 3] = -100
    out = model(ids, labels=labels)
    logp = out.logits.log_softmax(-1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(5) if labels[b, t + 1] != -100]
    ce = torch.stack(terms).mean()  # position t predicts token t+1; the last position has no target
    assert len(terms) == 9
    assert out.aux_loss is not None and len(out.router_logits) == 2
    assert out.router_logits[0].shape == (12, 4)
    aux_ref = load_balancing_loss(out.router_logits, 4, 2)
    assert_close("loss", out.loss, ce + 0.25 * aux_ref, atol=1e-12, rtol=1e-12)
    assert model(ids).loss is None and model(ids).aux_loss is None


def test_batch_equals_rows_lm() -> None:
    model = _model(seed=3)
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits
    for b in range(3):
        assert_close(f"logits[{b}]", full[b:b + 1], model(ids[b:b + 1]).logits, atol=1e-12, rtol=1e-10)


def test_block_structure() -> None:
    """logits = lm_head(norm(h)), h = x + attn(attn_norm(x)); h + mlp(mlp_norm(h)) per block (T=1 here too)."""
    model = _model(seed=5)
    ids = torch.randint(0, 97, (2, 1))
    h = model.model.embeddings(ids)
    eps = model.config.norm_eps

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * w

    for block in model.model.layers:
        h = h + block.attn(rms(h, block.attn_norm.weight))[0]
        u = rms(h, block.mlp_norm.weight)
        mlp = block.mlp
        h = h + mlp.down_proj(F.silu(mlp.gate_proj(u)) * mlp.up_proj(u))
    want = rms(h, model.model.norm.weight) @ model.lm_head.weight.t()
    assert_close("logits", model(ids).logits, want, atol=1e-12, rtol=1e-10)


def test_gradients_flow_through_lm() -> None:
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(**CFG))  # float32, as trained
    ids = torch.randint(0, 97, (2, 8))
    model(ids, labels=ids).loss.backward()
    for name in ("model.layers.0.attn.A_log", "model.layers.0.attn.dt_bias", "model.layers.1.attn.q_conv1d.weight",
                 "model.layers.0.attn.shared_k.weight", "model.layers.1.attn.gate.weight", "model.embeddings.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().max() > 0, name


def test_init_weights_like_fla() -> None:
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(**CFG, pad_token_id=0))
    mlp = model.model.layers[0].mlp.gate_proj.weight
    assert 0.018 < float(mlp.detach().std()) < 0.022  # N(0, initializer_range)
    assert not model.model.embeddings.weight[0].any()  # padding row zeroed
    q = model.model.layers[0].attn.q_proj.weight  # the attention keeps its xavier init
    assert q.abs().max() <= 2 ** -2.5 * math.sqrt(6 / (24 + 16)) and float(q.detach().std()) > 0.03
    assert torch.equal(model.model.norm.weight, torch.ones(24))


BAD_IDS = [
    ("rank1", lambda: torch.randint(0, 97, (7,)), "input_ids"),
    ("float", lambda: torch.zeros(1, 7), "input_ids"),
    ("vocab", lambda: torch.full((1, 7), 97), "input_ids"),
    ("negative", lambda: torch.full((1, 7), -1), "input_ids"),
    ("empty", lambda: torch.zeros(1, 0, dtype=torch.int64), "input_ids"),
]


@pytest.mark.parametrize("make,name", [c[1:] for c in BAD_IDS], ids=[c[0] for c in BAD_IDS])
def test_input_id_errors(make, name: str) -> None:
    with pytest.raises(InputError, match=name):
        _model()(make())


def test_label_and_cache_errors() -> None:
    model = _model()
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(InputError, match="labels"):
        model(ids, labels=ids[:, :4])
    with pytest.raises(InputError, match="labels"):
        model(ids, labels=torch.full_like(ids, 500))
    with pytest.raises(InputError, match="past_key_values"):
        model(ids, past_key_values=[])
    with pytest.raises(InputError, match="max_new_tokens"):
        model.generate(ids, -1)
