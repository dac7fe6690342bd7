"""MoMConfig: presets, derived sizes, dict round trip, and errors that name the field."""
from __future__ import annotations

import json

import pytest

from momtune.errors import ConfigError
from momtune.reference.config import PRESETS, MoMConfig

REQUIRED = ("hidden_size", "num_hidden_layers", "num_heads", "head_dim", "num_memories", "topk", "shared_mem")


def test_presets() -> None:
    assert set(PRESETS) == {"mom-340m", "mom-1.3b", "tiny"}
    for name, kw in PRESETS.items():
        assert all(k in kw for k in REQUIRED), name
    small, big = MoMConfig.from_preset("mom-340m"), MoMConfig.from_preset("mom-1.3b")
    assert (small.hidden_size, small.num_hidden_layers, small.num_heads, small.head_dim, small.expand_v,
            small.num_memories, small.topk, small.shared_mem, small.hidden_ratio) == (1024, 24, 4, 256, 1, 4, 2, True, 3)
    assert (big.hidden_size, big.hidden_ratio, big.num_memories, big.topk, big.head_dim) == (2048, 4, 4, 2, 256)
    # SwiGLU width 256 * ceil(int(D * ratio * 2/3) / 256): 1024*3*2/3 = 2048; 2048*4*2/3 = 5461 -> 5632; tiny 42 -> 256
    assert (small.mlp_width, big.mlp_width, MoMConfig.from_preset("tiny").mlp_width) == (2048, 5632, 256)
    assert MoMConfig.from_preset("tiny", intermediate_size=40).mlp_width == 40
    assert MoMConfig.from_preset("tiny", num_hidden_layers=1).num_hidden_layers == 1
    assert (small.key_dim, small.value_dim, MoMConfig.from_preset("tiny", expand_v=2).head_v_dim) == (1024, 1024, 32)


def test_fla_defaults() -> None:
    c = MoMConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_heads, c.head_dim, c.expand_v, c.num_memories,
            c.topk, c.shared_mem, c.single_kv_proj, c.conv_size, c.norm_eps, c.hidden_ratio, c.intermediate_size,
            c.hidden_act, c.tie_word_embeddings, c.aux_loss_scale, c.initializer_range, c.pad_token_id) == \
        (32000, 2048, 24, 4, 256, 1.0, 4, 2, True, False, 4, 1e-6, 4, None, "swish", False, 0.01, 0.02, None)


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="mom-340m.*mom-1.3b.*tiny"):
        MoMConfig.from_preset("mom-7b")


def test_dict_round_trip_and_fla_json() -> None:
    c = MoMConfig.from_preset("tiny", single_kv_proj=True)
    assert MoMConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    fla_json = {**MoMConfig.from_preset("mom-340m").to_dict(), "model_type": "mom", "fuse_norm": True,
                "fuse_cross_entropy": True, "mom_backend": "gated_deltanet", "attn": None, "use_cache": True,
                "architectures": ["MomForCausalLM"], "bos_token_id": 1, "eos_token_id": 2}
    # bos / eos ids are kept (generate's defaults), the rest of the fla / transformers keys skipped
    assert MoMConfig.from_dict(fla_json) == MoMConfig.from_preset("mom-340m", bos_token_id=1, eos_token_id=2)
    with pytest.raises(ConfigError, match="hiden_size"):
        MoMConfig.from_dict({"hiden_size": 8})
    assert MoMConfig.from_dict({"hiden_size": 8, "hidden_size": 64}, strict=False).hidden_size == 64
    with pytest.raises(ConfigError, match="attn"):
        MoMConfig.from_dict({**fla_json, "attn": {"layers": [1]}})


BAD = [
    (dict(topk=0), "topk"),
    (dict(topk=5), "topk"),  # num_memories 4
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_heads=-1), "num_heads"),
    (dict(head_dim=2.5), "head_dim"),
    (dict(num_memories=0), "num_memories"),
    (dict(expand_v=0.3), "expand_v"),  # 16 * 0.3 = 4.8
    (dict(expand_v=0), "expand_v"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attn_mode="parallel"), "attn_mode"),
    (dict(use_short_conv=False), "use_short_conv"),
    (dict(shared_mem="yes"), "shared_mem"),
    (dict(pad_token_id=97), "pad_token_id"),
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(hidden_ratio=None), "hidden_ratio"),
    (dict(aux_loss_scale=-1.0), "aux_loss_scale"),
]


@pytest.mark.parametrize("kw,field", BAD, ids=[f"{f}-{list(kw.values())[0]}" for kw, f in BAD])
def test_validate_names_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        MoMConfig.from_preset("tiny", **kw)
    assert isinstance(info.value, ValueError)
