"""Model configuration of a MoM causal LM, with flash-linear-attention 0.6.0's ``MomConfig`` field names.

    cfg = MoMConfig.from_preset("mom-340m", num_hidden_layers=2)
    cfg.to_dict() / MoMConfig.from_dict(d)      # also reads an fla ``config.json`` dict

Every field is checked in ``__post_init__`` (:meth:`MoMConfig.validate`); a bad value raises
:class:`momtune.errors.ConfigError` naming the field, the value and what is accepted.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from momtune.errors import ConfigError

#: Paper configs (arXiv 2502.13685) plus a tiny one for tests. Every entry names at least
#: hidden_size, num_hidden_layers, num_heads, head_dim, num_memories, topk and shared_mem.
PRESETS: dict[str, dict[str, Any]] = {
    "mom-340m": dict(hidden_size=1024, num_hidden_layers=24, num_heads=4, head_dim=256, expand_v=1.0,
                     num_memories=4, topk=2, shared_mem=True, hidden_ratio=3),
    "mom-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_heads=4, head_dim=256, expand_v=1.0,
                     num_memories=4, topk=2, shared_mem=True, hidden_ratio=4),
    "tiny": dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=16, expand_v=1.0,
                 num_memories=4, topk=2, shared_mem=True, hidden_ratio=2),
}

#: fla ``MomConfig`` keys that do not change the eval-mode math (kernel fusion switches, training
#: options); :meth:`MoMConfig.from_dict` skips them.
FLA_IGNORED_KEYS = frozenset({
    "fuse_norm", "fuse_swiglu", "fuse_cross_entropy", "fuse_conv_l2", "use_cache", "max_position_embeddings",
    "use_layer_wise_balance", "keys_to_ignore_at_inference",
})
#: Keys every Hugging Face ``PreTrainedConfig`` (transformers 4.x and 5.x) may write: output switches,
#: task heads, bookkeeping and the generation defaults of old configs. None of them changes the model;
#: :meth:`MoMConfig.from_dict` skips them (bos/eos/pad ids are fields: ``generate`` uses them).
HF_GENERIC_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "_commit_hash",
    "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal",
    "_experts_implementation", "auto_map", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "finetuning_task", "id2label", "label2id", "num_labels", "task_specific_params",
    "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
})
IGNORED_KEYS = FLA_IGNORED_KEYS | HF_GENERIC_KEYS
#: fla keys this reference accepts only at the value given (other values select unsupported models).
FIXED_KEYS: dict[str, Any] = {"model_type": "mom", "mom_backend": "gated_deltanet", "attn": None,
                              "attnres_block_size": None}

HIDDEN_ACTS = ("swish", "silu")
ATTN_MODES = ("chunk", "fused_recurrent")


@dataclass
class MoMConfig:
    """Hyper-parameters of :class:`momtune.reference.model.MoMForCausalLM` (fla ``MomConfig`` names)."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_heads: int = 4
    head_dim: int = 256
    expand_v: float = 1.0
    num_memories: int = 4
    topk: int = 2
    shared_mem: bool = True
    single_kv_proj: bool = False
    conv_size: int = 4
    norm_eps: float = 1e-6
    hidden_ratio: float | None = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    tie_word_embeddings: bool = False
    aux_loss_scale: float = 0.01
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None  # fla's MomConfig defaults to 1 and 2; None here: generate stops
    eos_token_id: int | list[int] | None = None  # at EOS only when a checkpoint or the caller names one
    use_output_gate: bool = True
    use_short_conv: bool = True
    attn_mode: str = "chunk"
    capacity: float = 1.0  # kept for fla compatibility; unused in eval mode (as in fla)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def key_dim(self) -> int:
        """H * K."""
        return self.num_heads * self.head_dim

    @property
    def head_v_dim(self) -> int:
        """V = head_dim * expand_v (validated to be an integer)."""
        return int(round(self.head_dim * self.expand_v))

    @property
    def value_dim(self) -> int:
        """H * V."""
        return self.num_heads * self.head_v_dim

    @property
    def mlp_width(self) -> int:
        """SwiGLU width: intermediate_size, else 256 * ceil(int(D * hidden_ratio * 2/3) / 256)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        width = int(self.hidden_size * self.hidden_ratio * 2 / 3)
        return 256 * ((width + 255) // 256)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ConfigError (naming the field and the accepted values) if any field is invalid."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim",
                     "num_memories", "conv_size"):
            _positive_int(name, getattr(self, name))
        _positive_int("topk", self.topk)
        if self.topk > self.num_memories:
            raise ConfigError(f"topk: {self.topk} is outside the accepted range 1..num_memories ({self.num_memories})")
        for name in ("shared_mem", "single_kv_proj", "tie_word_embeddings", "use_output_gate", "use_short_conv"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        _positive_float("expand_v", self.expand_v)
        v = self.head_dim * self.expand_v
        if abs(v - round(v)) > 1e-9 or round(v) < 1:
            raise ConfigError(
                f"expand_v: head_dim * expand_v = {self.head_dim} * {self.expand_v} = {v:g} is not a positive "
                f"integer; the per-head value dim must be integral (e.g. expand_v 1 or 2)")
        _positive_float("norm_eps", self.norm_eps)
        _positive_float("initializer_range", self.initializer_range)
        _positive_float("capacity", self.capacity)
        if not isinstance(self.aux_loss_scale, (int, float)) or isinstance(self.aux_loss_scale, bool) \
                or not self.aux_loss_scale >= 0:
            raise ConfigError(f"aux_loss_scale: expected a number >= 0, got {self.aux_loss_scale!r}")
        if self.intermediate_size is None:
            if self.hidden_ratio is None:
                raise ConfigError("hidden_ratio: None needs intermediate_size set; give one of them")
            _positive_float("hidden_ratio", self.hidden_ratio)
            if int(self.hidden_size * self.hidden_ratio * 2 / 3) < 1:
                raise ConfigError(f"hidden_ratio: {self.hidden_ratio} gives an MLP width of 0; use a larger value")
        else:
            _positive_int("intermediate_size", self.intermediate_size)
        if self.hidden_act not in HIDDEN_ACTS:
            raise ConfigError(f"hidden_act: {self.hidden_act!r} is not supported; choose one of {HIDDEN_ACTS}")
        if self.attn_mode not in ATTN_MODES:
            raise ConfigError(f"attn_mode: {self.attn_mode!r} is not supported; choose one of {ATTN_MODES}")
        for name in ("use_output_gate", "use_short_conv"):
            if getattr(self, name) is not True:
                raise ConfigError(f"{name}: only True is supported by momtune (fla's MoM checkpoints all use it)")
        if self.pad_token_id is not None:
            if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int) \
                    or not 0 <= self.pad_token_id < self.vocab_size:
                raise ConfigError(
                    f"pad_token_id: {self.pad_token_id!r} must be None or an int in 0..{self.vocab_size - 1}")
        for name in ("bos_token_id", "eos_token_id"):  # generation ids (range-checked by generate)
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" and value else [value]
            if value is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                also = " or a non-empty list of them" if name == "eos_token_id" else ""
                raise ConfigError(f"{name}: expected None or an int >= 0{also}, got {value!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MoMConfig:
        """The preset ``name`` (one of :data:`PRESETS`) with ``overrides`` applied."""
        if name not in PRESETS:
            raise ConfigError(f"preset: {name!r} is unknown; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = True) -> MoMConfig:
        """Build from a dict of fields; also accepts an fla ``config.json`` dict.

        Keys in :data:`IGNORED_KEYS` (fla training switches and Hugging Face's generic
        ``PreTrainedConfig`` keys) are skipped; keys in :data:`FIXED_KEYS` must have their supported
        value. Other unknown keys raise ConfigError naming them unless ``strict=False``.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a dict, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in d.items():
            if key in fields:
                kwargs[key] = value
            elif key in FIXED_KEYS:
                if value != FIXED_KEYS[key]:
                    raise ConfigError(f"{key}: {value!r} is not supported; only {FIXED_KEYS[key]!r} is")
            elif key not in IGNORED_KEYS:
                unknown.append(key)
        if unknown and strict:
            raise ConfigError(
                f"config: unknown keys {sorted(unknown)}; known fields are {sorted(fields)} "
                f"(pass strict=False to skip unknown keys)")
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"config: {e}") from e


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: expected a positive int (>= 1), got {value!r}")


def _positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: expected a finite number > 0, got {value!r}")
