"""fla-format checkpoint folders (issue 13, item 2): ``from_pretrained`` / ``save_pretrained`` round
trips, checkpoints written by fla's own ``save_pretrained`` (and ours read by fla's
``from_pretrained``; fla's classes are built on the CPU, their kernels never run: state_dicts are
compared), transformers' config keys, atomic writes, clear errors naming the file and the key,
and the transformers Auto registration (momtune.hf).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import momtune
from momtune.errors import ConfigError, InputError
from momtune.reference import checkpoint
from tests.helpers import assert_close

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention 0.6.0 is a test dependency")

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_kernels = pytest.mark.skipif(not INTERP and not torch.cuda.is_available(),
                                   reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[2]


def _fla_config(tie: bool = False, **kw) -> object:
    cfg = momtune.MoMConfig.from_preset("tiny")
    return fla_models.MomConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, expand_v=cfg.expand_v, num_memories=cfg.num_memories,
        topk=cfg.topk, shared_mem=cfg.shared_mem, hidden_ratio=cfg.hidden_ratio, tie_word_embeddings=tie, **kw)


def _fla_model(tie: bool = False, seed: int = 0, **kw):
    """fla's MomForCausalLM (on the CPU) with every weight random, so nothing equals its init."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fla_models.MomForCausalLM(_fla_config(tie, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def _random_model(cls=momtune.MoMForCausalLM, seed: int = 0, **overrides):
    cfg = momtune.MoMConfig.from_preset("tiny", **overrides)
    torch.manual_seed(seed)
    model = cls(cfg) if cls is momtune.reference.MoMForCausalLM else cls(cfg, backend="reference")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def _same_weights(a: torch.nn.Module, b: dict | torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b if isinstance(b, dict) else b.state_dict()
    assert set(sa) == set(sb)
    for k, v in sa.items():
        assert v.dtype == sb[k].dtype and torch.equal(v, sb[k]), k


def _ids(B: int = 2, T: int = 6) -> torch.Tensor:
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(4))


# ------------------------------------------------------------------ config keys
def test_config_from_an_fla_to_dict_accepts_transformers_keys():
    """fla's MomConfig.to_dict() holds 8 transformers keys the old from_dict refused (output_hidden_states,
    return_dict, chunk_size_feed_forward, is_encoder_decoder, id2label, label2id, problem_type,
    output_attentions); they are skipped, bos/eos/pad kept for generate."""
    d = _fla_config(eos_token_id=[2, 5], pad_token_id=0).to_dict()
    for key in ("output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
                "id2label", "label2id", "problem_type", "output_attentions"):
        assert key in d, key
    cfg = momtune.MoMConfig.from_dict(d)
    assert cfg == momtune.MoMConfig.from_preset("tiny", bos_token_id=1, eos_token_id=[2, 5], pad_token_id=0)
    hf_extra = {"torch_dtype": "bfloat16", "_name_or_path": "x", "use_cache": False, "auto_map": {},
                "tokenizer_class": "LlamaTokenizer", "max_length": 20, "_commit_hash": None}
    assert momtune.MoMConfig.from_dict({**d, **hf_extra}) == cfg


@pytest.mark.parametrize("key,value,says", [
    ("rope_theta", 10000.0, "unknown keys.*rope_theta"),
    ("quantization_config", {"bits": 4}, "unknown keys.*quantization_config"),
    ("model_type", "llama", "model_type: 'llama' is not supported"),
    ("eos_token_id", "2", "eos_token_id"),
    ("eos_token_id", [2, -1], "eos_token_id"),
    ("bos_token_id", [1], "bos_token_id"),
])
def test_config_refuses_what_would_change_the_model(key, value, says):
    d = _fla_config().to_dict()
    with pytest.raises(ConfigError, match=says):
        momtune.MoMConfig.from_dict({**d, key: value})


# ------------------------------------------------------------------ round trips
@needs_kernels
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_save_load_round_trip_equal_weights_and_logits(tmp_path, tie):
    model = _random_model(tie_word_embeddings=tie, eos_token_id=3, pad_token_id=0)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"], "no temporary file is left"
    loaded = momtune.MoMForCausalLM.from_pretrained(tmp_path, backend="triton", device=DEVICE)
    assert type(loaded) is momtune.MoMForCausalLM and loaded.backend == "triton" and not loaded.training
    assert loaded.config == model.config
    _same_weights(loaded.cpu(), model)
    if tie:
        assert loaded.lm_head.weight is loaded.model.embeddings.weight
        from safetensors import safe_open
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys(), "a tied lm_head is left out, as transformers does"
    ids = _ids()
    loaded = loaded.to(DEVICE)
    with torch.no_grad():
        got = loaded(ids.to(DEVICE)).logits.cpu()
        want = model(ids).logits
    assert_close("logits", got, want, 2e-3, 2e-3)


def test_reference_round_trip_and_dtypes(tmp_path):
    model = _random_model(momtune.reference.MoMForCausalLM).double()
    model.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model_type"] == "mom" and cfg["dtype"] == "float64" and cfg["architectures"] == ["MomForCausalLM"]
    same = momtune.reference.MoMForCausalLM.from_pretrained(tmp_path / "ck")  # dtype: as stored
    _same_weights(same, model)
    assert all(p.dtype == torch.float64 for p in same.parameters())
    for dtype in (torch.float32, "float32", "torch.float32"):
        assert momtune.reference.MoMForCausalLM.from_pretrained(tmp_path / "ck", dtype=dtype).lm_head.weight.dtype \
            == torch.float32
    bf16 = momtune.MoMForCausalLM.from_pretrained(str(tmp_path / "ck"), torch_dtype=torch.bfloat16, backend="reference")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    bf16.save_pretrained(tmp_path / "bf16")
    again = momtune.MoMForCausalLM.from_pretrained(tmp_path / "bf16", backend="reference")
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    _same_weights(again, bf16)


def test_saving_over_a_checkpoint_replaces_it(tmp_path):
    _random_model(seed=1).save_pretrained(tmp_path)
    new = _random_model(seed=2, num_hidden_layers=1)
    new.save_pretrained(tmp_path)
    _same_weights(momtune.MoMForCausalLM.from_pretrained(tmp_path, backend="reference"), new)


# ------------------------------------------------------------------ fla's own classes
@needs_kernels
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_checkpoint_saved_by_fla_loads_and_gives_the_reference_logits(tmp_path, tie):
    fla = _fla_model(tie, eos_token_id=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fla.save_pretrained(tmp_path)
    fast = momtune.MoMForCausalLM.from_pretrained(tmp_path, backend="triton", device=DEVICE)
    ref = momtune.reference.MoMForCausalLM.from_pretrained(tmp_path)
    _same_weights(ref, fla)
    _same_weights(fast.cpu(), fla)
    assert fast.config.eos_token_id == 7 and fast.config.bos_token_id == 1 and fast.config.tie_word_embeddings == tie
    ids = _ids()
    with torch.no_grad():
        got = fast.to(DEVICE)(ids.to(DEVICE)).logits.cpu()
        want = ref(ids).logits
    assert_close("logits", got, want, 2e-3, 2e-3)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fla_loads_what_momtune_saves(tmp_path, tie):
    model = _random_model(tie_word_embeddings=tie, eos_token_id=[3, 4], bos_token_id=1)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fla = fla_models.MomForCausalLM.from_pretrained(tmp_path)
    assert type(fla.config) is fla_models.MomConfig
    c = fla.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_heads, c.head_dim, c.num_memories, c.topk, c.shared_mem,
            c.hidden_ratio, c.vocab_size, c.tie_word_embeddings, c.eos_token_id) == \
        (32, 2, 2, 16, 4, 2, True, 2, 97, tie, [3, 4])
    _same_weights(model, {k: v for k, v in fla.state_dict().items()})
    assert momtune.MoMConfig.from_dict(fla.config.to_dict()) == model.config


def test_config_object_and_generation_config(tmp_path):
    """config= (fla's MomConfig) replaces config.json; generation_config.json's ids win (as transformers)."""
    fla = _fla_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fla.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9], "pad_token_id": 0,
                                                                  "do_sample": True, "temperature": 0.6}))
    model = momtune.reference.MoMForCausalLM.from_pretrained(tmp_path)
    assert (model.config.eos_token_id, model.config.pad_token_id) == ([2, 9], 0)
    cfg = momtune.reference.MoMForCausalLM.from_pretrained(tmp_path, config=fla.config).config
    assert cfg.eos_token_id == 2 and cfg.hidden_size == 32
    with pytest.raises(InputError, match="config: expected a MoMConfig"):
        momtune.reference.MoMForCausalLM.from_pretrained(tmp_path, config={"hidden_size": 32})


# ------------------------------------------------------------------ other weight files
def test_pytorch_model_bin_and_sharded_checkpoints(tmp_path):
    model = _random_model(momtune.reference.MoMForCausalLM)
    model.save_pretrained(tmp_path / "st")
    state = model.state_dict()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_bytes((tmp_path / "st" / "config.json").read_bytes())
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    _same_weights(momtune.reference.MoMForCausalLM.from_pretrained(tmp_path / "bin"), model)
    from safetensors.torch import save_file
    shard = tmp_path / "shards"
    shard.mkdir()
    (shard / "config.json").write_bytes((tmp_path / "st" / "config.json").read_bytes())
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[:30], "model-00002-of-00002.safetensors": names[30:]}
    for file, keys in parts.items():
        save_file({k: state[k].contiguous() for k in keys}, str(shard / file), metadata={"format": "pt"})
    (shard / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}))
    _same_weights(momtune.reference.MoMForCausalLM.from_pretrained(shard), model)


# ------------------------------------------------------------------ atomic writes
def test_a_failed_save_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    old = _random_model(seed=1)
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import safetensors.torch

    def dies(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        _random_model(seed=2).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "no temporary file left, nothing changed"
    _same_weights(momtune.MoMForCausalLM.from_pretrained(tmp_path, backend="reference"), old)


# ------------------------------------------------------------------ errors
def _checkpoint(tmp_path: Path) -> Path:
    _random_model(momtune.reference.MoMForCausalLM).save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder: Path, **changes) -> None:
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("change,says", [
    (dict(hidden_size="32"), "hidden_size: expected a positive int"),
    (dict(num_memories=4.5), "num_memories"),
    (dict(shared_mem="true"), "shared_mem"),
    (dict(topk=9), "topk"),
    (dict(hiden_size=32), "unknown keys.*hiden_size"),
    (dict(model_type="llama"), "model_type"),
], ids=["hidden_size-str", "num_memories-float", "shared_mem-str", "topk-9", "typo-key", "model_type"])
def test_a_bad_config_key_names_the_file_and_the_key(tmp_path, change, says):
    folder = _checkpoint(tmp_path)
    _edit_config(folder, **change)
    with pytest.raises(ConfigError, match=says) as info:
        momtune.MoMForCausalLM.from_pretrained(folder)
    assert str(folder / "config.json") in str(info.value)


def test_missing_or_unreadable_files_are_named(tmp_path):
    folder = _checkpoint(tmp_path)
    (folder / "config.json").rename(folder / "config.json.bak")
    with pytest.raises(ConfigError, match=r"config\.json: not found") as info:
        momtune.MoMForCausalLM.from_pretrained(folder)
    assert str(folder / "config.json") in str(info.value)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not readable JSON"):
        momtune.MoMForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object"):
        momtune.MoMForCausalLM.from_pretrained(folder)
    (folder / "config.json.bak").rename(folder / "config.json")
    (folder / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match=r"model\.safetensors: cannot be read as safetensors"):
        momtune.MoMForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"holds no weights; expected one of model\.safetensors"):
        momtune.MoMForCausalLM.from_pretrained(folder)
    with pytest.raises(InputError, match="is not a folder"):
        momtune.MoMForCausalLM.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(InputError, match="snapshot_download"):
        momtune.MoMForCausalLM.from_pretrained("fla-hub/mom-gated-deltanet-340M")


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    folder = _checkpoint(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(str(folder / "model.safetensors"))
    partial = {k: v for k, v in state.items() if k != "model.layers.1.attn.A_log"}
    save_file({**partial, "model.extra.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match=r"model\.safetensors: does not match .*config\.json.*"
                                         r"model\.layers\.1\.attn\.A_log.*model\.extra\.weight"):
        momtune.MoMForCausalLM.from_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"))
    _edit_config(folder, intermediate_size=64)  # a narrower MLP than the weights (256)
    with pytest.raises(InputError, match=r"model\.safetensors: does not fit .*config\.json: tensor shapes "
                                         r".*model\.layers\.0\.mlp\.gate_proj\.weight \[256, 32\] "
                                         r"\(the config's: \[64, 32\]\)"):
        momtune.MoMForCausalLM.from_pretrained(folder)


def test_bad_from_pretrained_arguments(tmp_path):
    folder = _checkpoint(tmp_path)
    with pytest.raises(InputError, match="unknown keyword argument low_cpu_mem_usage; accepted: dtype, device"):
        momtune.MoMForCausalLM.from_pretrained(folder, low_cpu_mem_usage=True)
    with pytest.raises(InputError, match="backend"):
        momtune.reference.MoMForCausalLM.from_pretrained(folder, backend="triton")
    with pytest.raises(InputError, match="dtype: 'float8'"):
        momtune.MoMForCausalLM.from_pretrained(folder, dtype="float8")
    with pytest.raises(InputError, match="torch_dtype: the same as dtype"):
        momtune.MoMForCausalLM.from_pretrained(folder, dtype="float32", torch_dtype="float32")
    with pytest.raises(InputError, match="device: expected a device"):
        momtune.MoMForCausalLM.from_pretrained(folder, device="gpu7")
    with pytest.raises(InputError, match="save_directory: .* is not a folder"):
        _random_model().save_pretrained(folder / "config.json")


# ------------------------------------------------------------------ transformers' Auto classes
_AUTO = """
import json, sys, warnings
warnings.simplefilter("ignore")
import torch, momtune.hf
from transformers import AutoConfig, AutoModelForCausalLM
folder = sys.argv[1]
out = {"first": momtune.hf.register(), "again": momtune.hf.register()}
out["config"] = type(AutoConfig.from_pretrained(folder)).__name__
m = AutoModelForCausalLM.from_pretrained(folder, backend="reference", dtype=torch.float64)
out["model"] = type(m).__module__ + "." + type(m).__name__
out["dtype"] = str(m.lm_head.weight.dtype)
import fla.models  # fla registers "mom" with exist_ok=True: its Auto classes win from here on
out["after_fla"] = momtune.hf.register()
out["model_after_fla"] = type(AutoModelForCausalLM.from_pretrained(folder)).__module__
print(json.dumps(out))
"""


def test_transformers_auto_classes(tmp_path):
    pytest.importorskip("transformers")
    folder = _checkpoint(tmp_path)
    run = subprocess.run([sys.executable, "-c", _AUTO, str(folder)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"first": "momtune", "again": "momtune", "config": "MomtuneMomConfig",
                   "model": "momtune.lm.MoMForCausalLM", "dtype": "torch.float64", "after_fla": "fla",
                   "model_after_fla": "fla.models.mom.modeling_mom"}


def test_register_when_fla_came_first():
    import momtune.hf
    assert momtune.hf.register() == "fla"  # this module imported fla.models
    assert checkpoint.SAFETENSORS == "model.safetensors"
