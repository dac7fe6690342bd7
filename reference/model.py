"""The reference MoM causal LM: flash-linear-attention 0.6.0 ``MomForCausalLM`` (eval mode) in plain PyTorch.

    embeddings -> N x [x + attn(attn_norm(x)); x + mlp(mlp_norm(x))] -> norm -> lm_head

RMSNorms compute in fp32 (float64 for a float64 model); the MLP is SwiGLU
``down(silu(gate(x)) * up(x))``. State-dict names equal fla's (``model.layers.{i}.attn.k_proj.3.weight``
...), so fla checkpoints load with ``strict=True``. Loss as fla: labels shifted left (last position
ignored), cross-entropy on fp32 logits, plus ``aux_loss_scale * load_balancing_loss``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from momtune.checks import check_int, check_tensor
from momtune.errors import InputError

from . import checkpoint
from . import generate as generate_mod
from .cache import MoMCache
from .config import MoMConfig
from .generate import GenerateOutput
from .layer import MoMAttention
from .norm import rms_norm

IGNORE_INDEX = -100
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss over the logits of all layers.

    router_logits: per layer [N, E] (N = B*T tokens), concatenated along N. With p = softmax(logits),
    f[j, e] = mean_n onehot(topk(p)[n, j])[e] and P[e] = mean_n p[n, e]:  loss = E * sum_{j,e} f[j, e] P[e].
    ``valid`` [N] bool (optional): the means run over the valid (unpadded) tokens only.
    """
    if not isinstance(router_logits, (tuple, list)) or not router_logits:
        raise InputError("router_logits: expected a non-empty tuple of [N, E] tensors (one per layer)")
    logits = torch.cat([r.to(router_logits[0].device) for r in router_logits], dim=0)
    check_tensor("router_logits", logits, shape=(None, num_experts))
    check_int("top_k", top_k, lo=1, hi=num_experts)
    p = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # [N, E]
    selected = torch.topk(p, top_k, dim=-1).indices  # [N, top_k]
    hot = F.one_hot(selected, num_experts).to(p.dtype)  # [N, top_k, E]
    if valid is None:
        tokens_per_expert, router_prob = hot.mean(0), p.mean(0)  # [top_k, E], [E]
    else:
        w = valid.to(p.device, p.dtype).repeat(len(router_logits))  # the same tokens in every layer
        w = w / w.sum().clamp_min(1)
        tokens_per_expert, router_prob = (hot * w[:, None, None]).sum(0), (p * w[:, None]).sum(0)
    return num_experts * (tokens_per_expert * router_prob[None]).sum()


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 (fp64 for fp64)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MoMMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)); gate/up [I, D], down [D, I]."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoMBlock(nn.Module):
    """x + attn(attn_norm(x)), then + mlp(mlp_norm(.))."""

    def __init__(self, config: MoMConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.attn_norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.attn = MoMAttention(
            hidden_size=c.hidden_size, head_dim=c.head_dim, num_heads=c.num_heads, expand_v=c.expand_v,
            mode=c.attn_mode, use_output_gate=c.use_output_gate, use_short_conv=c.use_short_conv,
            conv_size=c.conv_size, norm_eps=c.norm_eps, layer_idx=layer_idx, num_memories=c.num_memories,
            topk=c.topk, capacity=c.capacity, shared_mem=c.shared_mem, single_kv_proj=c.single_kv_proj)
        self.mlp_norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mlp = MoMMLP(c.hidden_size, c.mlp_width)

    def forward(self, x: torch.Tensor, cache: MoMCache | None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (x' [B, T, D], router_logits [B*T, E])."""
        o, router_logits, _ = self.attn(self.attn_norm(x), attention_mask, past_key_values=cache)
        x = x + o
        return x + self.mlp(self.mlp_norm(x)), router_logits


class MoMModel(nn.Module):
    """embeddings -> blocks -> norm (fla ``MomModel``)."""

    def __init__(self, config: MoMConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MoMBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


@dataclass
class MoMCausalLMOutput:
    """loss: CE + aux_loss_scale * aux_loss (None without labels); logits [B, T, vocab];
    aux_loss (None without labels, as fla); router_logits: per layer [B*T, E]; past_key_values."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    aux_loss: torch.Tensor | None
    router_logits: tuple[torch.Tensor, ...]
    past_key_values: MoMCache | None


class MoMForCausalLM(nn.Module):
    """Reference MoM causal LM; ``forward`` returns :class:`MoMCausalLMOutput`."""

    def __init__(self, config: MoMConfig) -> None:
        super().__init__()
        if not isinstance(config, MoMConfig):
            raise InputError(f"config: expected a MoMConfig, got {type(config).__name__}")
        self.config = config
        self.model = MoMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """fla's ``_init_weights`` as applied by ``post_init``: Linear and Embedding weights ~ N(0,
        initializer_range) (the padding row zeroed), norm weights 1. The attention layers keep their
        own init (xavier-uniform gain 2^-2.5 Linears, conv default, A_log / dt_bias), because fla
        marks them ``_is_hf_initialized`` and Hugging Face's post_init skips them. Ties lm_head."""
        std = self.config.initializer_range
        attn_modules = {id(m) for block in self.model.layers for m in block.attn.modules()}
        for module in self.modules():
            if id(module) in attn_modules:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As nn.Module's; with tied embeddings a missing ``lm_head.weight`` is taken from the embeddings."""
        if self.config.tie_word_embeddings and "lm_head.weight" not in state_dict \
                and "model.embeddings.weight" in state_dict:
            state_dict = {**state_dict, "lm_head.weight": state_dict["model.embeddings.weight"]}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        past_key_values: MoMCache | None = None,
        use_cache: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> MoMCausalLMOutput:
        """input_ids [B, T] -> logits [B, T, vocab] (+ loss with labels [B, T]; -100 = ignored).

        With ``past_key_values`` (or ``use_cache=True``) every layer continues from / updates the cache.
        ``attention_mask`` [B, T'] (T' >= T, last T columns; 1 = token, 0 = padding) as fla's: padding
        joins no memory in any layer and the aux loss skips it (give its labels -100).
        """
        self._check_ids("input_ids", input_ids)
        if past_key_values is not None and not isinstance(past_key_values, MoMCache):
            raise InputError(f"past_key_values: expected a MoMCache or None, got {type(past_key_values).__name__}")
        cache = MoMCache() if past_key_values is None and use_cache else past_key_values
        x = self.model.embeddings(input_ids)
        router_logits = []
        for block in self.model.layers:
            x, r = block(x, cache, attention_mask)
            router_logits.append(r)
        logits = self.lm_head(self.model.norm(x))
        loss = aux_loss = None
        if labels is not None:
            self._check_ids("labels", labels, shape=tuple(input_ids.shape), allow_ignore=True)
            shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
            lf = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(lf.reshape(-1, lf.shape[-1]), shifted.reshape(-1).long(), ignore_index=IGNORE_INDEX)
            valid = None
            if attention_mask is not None:
                valid = attention_mask[:, attention_mask.shape[1] - input_ids.shape[1]:].reshape(-1)
                valid = valid if valid.dtype == torch.bool else valid == 1
            aux_loss = load_balancing_loss(tuple(router_logits), self.config.num_memories, self.config.topk, valid)
            loss = loss + self.config.aux_loss_scale * aux_loss.to(loss.dtype)
        return MoMCausalLMOutput(loss, logits, aux_loss, tuple(router_logits), cache)

    #: Steps between the host's checks for "every row finished" in ``generate`` (1: every step).
    generate_sync_every = 1
    #: Keywords of ``generate`` beyond transformers' (this class's), with their defaults.
    generate_extras: dict[str, Any] = {}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, max_new_tokens: int | None = None,
                 **kwargs: Any) -> torch.Tensor | GenerateOutput:
        """Prefill input_ids [B, T] into a fresh cache, then decode one token at a time; transformers'
        keywords (:data:`momtune.reference.generate.ACCEPTED`; any other is an InputError naming it).

        Returns [B, T + n] (or, with ``return_dict_in_generate=True``, a :class:`GenerateOutput` with
        ``.sequences`` and, with ``output_scores=True``, ``.scores``). n = ``max_new_tokens`` (else
        ``max_length`` - T; one of them is needed), fewer when every row emitted an ``eos_token_id``
        (default: the config's; after its EOS a row holds ``pad_token_id``). Greedy unless
        ``do_sample`` (softmax of the logits / ``temperature``, kept to the ``top_k`` largest and the
        ``top_p`` nucleus, drawn with ``generator``). ``attention_mask`` [B, T]: prompts of different
        lengths, left-padded (0 = padding); the generated tokens are all real.
        """
        input_ids, args = generate_mod.parse(self, input_ids, max_new_tokens, kwargs, self.generate_extras)
        start, step = self._decoder(input_ids, args)
        return generate_mod.run(input_ids, args, start, step, self.generate_sync_every)

    def _decoder(self, input_ids: torch.Tensor, args: generate_mod.GenerateArgs) -> tuple[
            Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """(prefill -> last logits [B, vocab], step ids [B, 1] -> logits [B, vocab]) over a fresh cache."""
        cache = MoMCache()

        def start() -> torch.Tensor:
            return self(input_ids, past_key_values=cache, attention_mask=args.attention_mask).logits[:, -1]

        def step(ids: torch.Tensor) -> torch.Tensor:
            return self(ids, past_key_values=cache).logits[:, -1]
        return start, step

    # ------------------------------------------------------------------ checkpoints (fla's format)
    #: Keywords of ``from_pretrained`` passed on to this class's constructor.
    pretrained_extras: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, config: Any = None,
                        strict_config: bool = True, **kwargs: Any) -> MoMForCausalLM:
        """Load an fla-format checkpoint folder (config.json + model.safetensors, see
        :mod:`momtune.reference.checkpoint`), in eval mode. ``dtype``: None / "auto" keeps the stored
        dtype (``torch_dtype`` is the same); ``device``: where to put it (default CPU; ``device_map``
        naming one device is the same). Weights load with strict=True; a missing, unexpected or
        misshapen tensor is an InputError naming the file and the tensors. ``config`` (a MoMConfig, or a
        transformers config such as fla's ``MomConfig``) replaces config.json's."""
        aliases = {"torch_dtype": "dtype", "device_map": "device"}
        unknown = sorted(k for k in kwargs if k not in aliases and k not in cls.pretrained_extras)
        if unknown:
            raise InputError(f"from_pretrained: unknown keyword argument{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(unknown)}; accepted: dtype, device, config, strict_config"
                             f"{''.join(', ' + k for k in cls.pretrained_extras)} (and torch_dtype, device_map)")
        for alias, name in aliases.items():
            if kwargs.get(alias) is not None:
                if (dtype if name == "dtype" else device) is not None:
                    raise InputError(f"{alias}: the same as {name}; give one of them")
                dtype, device = (kwargs[alias], device) if name == "dtype" else (dtype, kwargs[alias])
        model_kwargs = {k: v for k, v in kwargs.items() if k in cls.pretrained_extras}
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError):
                raise InputError(f"device: expected a device ('cpu', 'cuda:0', an index or a torch.device), "
                                 f"got {device!r}") from None
        folder = checkpoint.folder_of(path)
        dtype = checkpoint.resolve_dtype("dtype", dtype)
        if config is None:
            config, recorded = checkpoint.read_config(folder, strict=strict_config)
        else:
            config, recorded = checkpoint.as_config(config, strict=strict_config), None
        state, file = checkpoint.read_state_dict(folder)
        model = cls(config, **model_kwargs)
        expected = model.state_dict()
        wrong = [f"{k} {list(v.shape)} (the config's: {list(expected[k].shape)})" for k, v in state.items()
                 if k in expected and v.shape != expected[k].shape]
        if wrong:
            raise InputError(f"{file}: does not fit {folder / checkpoint.CONFIG}: tensor shapes "
                             f"{'; '.join(wrong[:6])}{' ...' if len(wrong) > 6 else ''}")
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            more = max(len(result.missing_keys), len(result.unexpected_keys)) > 8
            raise InputError(f"{file}: does not match {folder / checkpoint.CONFIG}: missing tensors "
                             f"{result.missing_keys[:8]}, unexpected tensors {result.unexpected_keys[:8]}"
                             f"{' (more left out)' if more else ''}")
        return model.to(device=device, dtype=dtype or checkpoint.stored_dtype(state, recorded)).eval()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json (fla's keys; fla's ``MomForCausalLM.from_pretrained`` loads the folder)
        and model.safetensors, each atomically (a temporary file renamed over the old one)."""
        checkpoint.write(save_directory, self.config, self.state_dict())

    def _check_ids(self, name: str, ids: object, shape: tuple[int, ...] | None = None,
                   allow_ignore: bool = False) -> None:
        check_tensor(name, ids, ndim=2, dtypes=INT_DTYPES)
        assert isinstance(ids, torch.Tensor)
        if shape is not None and tuple(ids.shape) != shape:
            raise InputError(f"{name}: shape {list(ids.shape)} must equal input_ids' shape {list(shape)}")
        if ids.shape[0] < 1 or ids.shape[1] < 1:
            raise InputError(f"{name}: needs at least one row and one token, got shape {list(ids.shape)}")
        vocab = self.config.vocab_size
        bad = (ids < 0) | (ids >= vocab)
        if allow_ignore:
            bad &= ids != IGNORE_INDEX
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise InputError(f"{name}: value {int(ids[where])} at {where} is outside 0..{vocab - 1} "
                             f"(vocab_size {vocab}){' or -100 (ignored)' if allow_ignore else ''}")
