"""``momtune.apply(model)``: a loaded flash-linear-attention 0.6.0 MoM model, made fast in place.

Every fla ``MomAttention`` of the module tree becomes :class:`FlaMoMAttention` (momtune's fast
layer behind fla's call convention), every fla ``RMSNorm`` :class:`FlaRMSNorm` (the ``norm``
kernel) and every fla ``GatedMLP`` (SwiGLU) :class:`FlaGatedMLP` (the ``swiglu`` kernel between
the GEMMs). The rest of the tree -- fla's ``MomForCausalLM``, ``MomModel`` and ``MomBlock``, the
embeddings, the LM head, the loss, HF's ``generate`` -- is fla's and transformers' own code,
which calls the swapped modules exactly as it called fla's:

    attention  forward(hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                       output_attentions=False, **kwargs) -> (o, None, past_key_values, router_logits
                       [B*T, E])   (kwargs: cu_seqlens is used, the rest ignored, as fla)
    RMSNorm    forward(x, residual=None, prenorm=False, residual_in_fp32=False) -> y, or (y, x + residual)
    GatedMLP   forward(x, **kwargs) -> down_proj(silu(gate_proj(x)) * up_proj(x))

Weights: the swapped modules hold fla's own ``Parameter`` objects (an optimizer built before
``apply`` keeps training them; the MLP keeps fla's ``nn.Linear`` modules), so the state_dict's
keys and values are unchanged. The attention's projection weights become views of its fused
projection weight (one copy of their values, made at ``apply``; see :mod:`momtune.model`).

Cache: fla's ``Cache`` (what fla's ``MomModel`` and HF ``generate`` pass) holds, per swapped
layer, ``recurrent_state = (state,)`` and ``conv_state = (conv_q, conv_k, conv_v)`` in momtune's
layout (:mod:`momtune.reference.cache`: batch first, so HF's reorder/select of cache rows works);
the token count advances by the tokens processed. An entry written by fla's own layer (another
layout) is refused, not misread: start a new cache after ``apply``.

Backends as :class:`momtune.MoMAttention`: under autograd the norms and SwiGLU run their forward
and backward kernels (:mod:`momtune.functions`), and so does the attention's prefill without a
cache (padding masks included); with a cache ``auto`` runs the attention's PyTorch reference, so
training loops keep working. The math is fla's eval-mode
math (fla in training mode runs its short convs across memory segments; momtune never does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from momtune import settings
from momtune.checks import check_choice
from momtune.errors import InputError, MomtuneError
from momtune.model import BACKENDS, MoMAttention, resolve_backend
from momtune.reference.cache import LayerCache, MoMCache

#: fla 0.6.0 classes apply() swaps (exact types: a subclass may change the math), by kind.
FLA_CLASSES = {
    ("fla.layers.mom", "MomAttention"): "MomAttention",
    ("fla.modules.norm.layernorm", "RMSNorm"): "RMSNorm",
    ("fla.modules.mlp", "GatedMLP"): "GatedMLP",
}
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class FlaMoMAttention(MoMAttention):
    """momtune's fast MoM layer with fla ``MomAttention``'s call convention and cache (module docstring)."""

    @classmethod
    def from_fla(cls, fla: nn.Module, backend: str) -> FlaMoMAttention:
        """A fast layer holding ``fla``'s parameters (the same objects); InputError if momtune
        cannot compute what ``fla`` computes (unsupported options, other parameters)."""
        kw = dict(hidden_size=fla.hidden_size, head_dim=fla.head_dim, num_heads=fla.num_heads,
                  expand_v=fla.expand_v, mode=fla.mode, use_output_gate=fla.use_output_gate,
                  use_short_conv=fla.use_short_conv, conv_size=getattr(fla, "conv_size", 4),
                  conv_bias=fla.conv_bias, layer_idx=fla.layer_idx, norm_eps=fla.o_norm.eps,
                  num_memories=fla.num_memories, topk=fla.topk, capacity=fla.capacity,
                  shared_mem=fla.shared_mem, single_kv_proj=fla.single_kv_proj)
        if getattr(fla.o_norm, "activation", "swish") not in ("swish", "silu"):
            raise InputError(f"o_norm: activation {fla.o_norm.activation!r}; momtune's gated norm is swish")
        with torch.device("meta"):  # no init work: every parameter is replaced by fla's below
            new = cls(**kw, backend=backend)
        theirs, mine = dict(fla.named_parameters()), dict(new.named_parameters())
        if set(theirs) != set(mine):
            raise InputError(f"parameters: fla's {sorted(set(theirs) - set(mine))[:4]} have no momtune "
                             f"counterpart, momtune's {sorted(set(mine) - set(theirs))[:4]} none in fla")
        wrong = [f"{k} {list(p.shape)} (momtune: {list(mine[k].shape)})" for k, p in theirs.items()
                 if p.shape != mine[k].shape]
        if wrong or any(True for _ in fla.buffers()):
            raise InputError(f"parameters: shapes differ: {wrong[:4]}" if wrong else "buffers: fla's layer holds "
                             f"buffers {[k for k, _ in fla.named_buffers()]}; momtune's has none")
        for name, p in theirs.items():
            owner, _, leaf = name.rpartition(".")
            new.get_submodule(owner)._parameters[leaf] = p
        new._fused, new._fused_views = None, []
        new._flatten(new._projection_weights())  # fla's projection weights become views of the fused one
        for name, sub in new.named_modules():  # as fla's: HF's init_weights must not re-initialise them
            if getattr(_submodule(fla, name), "_is_hf_initialized", False):
                sub._is_hf_initialized = True
        return new.train(fla.training)

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, Any, torch.Tensor]:
        """As fla's: (o [B, T, D], None, past_key_values, router_logits [B*T, E]); with
        ``cu_seqlens`` (packed, x [1, N, D]) o is [1, N, D] and router_logits [N, E]. Keyword
        arguments other than ``cu_seqlens`` and ``cache`` are ignored, as fla.

        ``cache``: transformers 5's name for the cache. Its ``generate`` passes the cache as
        ``cache=``, which fla 0.6.0's ``MomForCausalLM`` does not know: it hands it down in kwargs
        and makes a new empty cache as ``past_key_values`` at every step (so fla's own layers
        decode from an empty state). This layer uses ``cache`` when given and returns it, which
        fla's ``MomModel`` passes on as the model's cache: ``generate`` continues from it."""
        extra = {} if kwargs.get("cu_seqlens") is None else {"cu_seqlens": kwargs["cu_seqlens"]}
        if kwargs.get("cache") is not None:  # transformers 5 passes generate's cache as `cache` (see above)
            past_key_values = kwargs["cache"]
        if past_key_values is None or isinstance(past_key_values, MoMCache):
            o, logits, _ = super().forward(hidden_states, attention_mask, past_key_values, False, **extra)
            return o, None, past_key_values, logits
        if self.layer_idx is None:
            raise InputError("past_key_values: this layer has no layer_idx, so it has no entry in the cache; "
                             "give the layer a layer_idx (fla's MomBlock does)")
        cache = MoMCache()
        entry = self._read_entry(past_key_values)
        if entry is not None:
            cache.layers[self._cache_key] = entry
        o, logits, _ = super().forward(hidden_states, attention_mask, cache, False, **extra)
        e = cache.layers[self._cache_key]
        past_key_values.update(recurrent_state=(e.state,), conv_state=(e.conv_q, e.conv_k, e.conv_v),
                               layer_idx=self.layer_idx, offset=e.seen_tokens)
        return o, None, past_key_values, logits

    def _read_entry(self, cache: Any) -> LayerCache | None:
        """This layer's state in fla's ``cache`` as a :class:`LayerCache` (seen_tokens 0: it counts
        this call's tokens), None when empty; an entry in another layout is an InputError."""
        for name in ("update", "__getitem__", "__len__"):
            if not hasattr(cache, name):
                raise InputError(f"past_key_values: expected fla's Cache (or a momtune MoMCache), got "
                                 f"{type(cache).__name__}")
        state = cache[self.layer_idx] if len(cache) > self.layer_idx else None
        if not state:
            return None
        rs, cs = state.get("recurrent_state"), state.get("conv_state")
        if rs is None and cs is None:
            return None
        ours = (isinstance(rs, (tuple, list)) and len(rs) == 1 and isinstance(rs[0], torch.Tensor)
                and rs[0].dim() == 5 and isinstance(cs, (tuple, list)) and len(cs) == 3
                and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in cs))
        if not ours:
            raise InputError(f"past_key_values: layer {self.layer_idx}'s entry is not in momtune's layout "
                             "(recurrent_state (state [B, M, H, K, V],), conv_state (q, k, v windows [B, M, W-1, C])); "
                             "it was written by fla's own MomAttention, before momtune.apply: start a new cache")
        return LayerCache(rs[0], cs[0], cs[1], cs[2], seen_tokens=0)


class FlaRMSNorm(nn.Module):
    """fla ``RMSNorm`` (weight, no bias) on the ``norm`` kernel (the residual add fused in)."""

    def __init__(self, fla: nn.Module, backend: str) -> None:
        super().__init__()
        self.hidden_size, self.elementwise_affine, self.eps = fla.hidden_size, True, fla.eps
        self.weight = fla.weight  # fla's Parameter itself
        self.register_parameter("bias", None)
        self.backend, self._configs = backend, {}
        self.train(fla.training)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False,
                residual_in_fp32: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """As fla's: y = rms_norm(x + residual) * weight in x's dtype; with ``prenorm`` also the sum
        (in residual's dtype, float32 with ``residual_in_fp32`` and no residual)."""
        if self._on_kernel(x, residual, residual_in_fp32):
            from momtune.functions import rms_norm_op

            D = x.shape[-1]
            x2 = x.reshape(-1, D)
            r2 = None if residual is None else residual.reshape(-1, D)
            y, h = rms_norm_op(self._configs, x2, self.weight, self.eps, r2)  # trains on norm_bwd
            y, h = y.view(x.shape), h.view(x.shape)
        else:
            cd = torch.promote_types(x.dtype, torch.float32)
            h = x.to(cd) if residual is None else x.to(cd) + residual.to(cd)
            y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(cd)).to(x.dtype)
            h = h.to(residual.dtype if residual is not None else torch.float32 if residual_in_fp32 else x.dtype)
        return (y, h) if prenorm else y

    def _on_kernel(self, x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool) -> bool:
        if resolve_backend(self.backend, x, self, backward=True) != "triton":
            return False
        return (x.dtype in KERNEL_DTYPES and self.weight.dtype in KERNEL_DTYPES and x.dim() >= 1
                and x.shape[-1] == self.weight.shape[0]
                and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))
                and not (residual is None and residual_in_fp32 and x.dtype != torch.float32))

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, backend={self.backend!r}"


class FlaGatedMLP(nn.Module):
    """fla ``GatedMLP`` (swish): its own gate/up/down ``nn.Linear`` modules, the ``swiglu`` kernel between."""

    def __init__(self, fla: nn.Module, backend: str) -> None:
        super().__init__()
        for name in ("hidden_size", "hidden_ratio", "intermediate_size", "hidden_act", "fuse_swiglu"):
            setattr(self, name, getattr(fla, name))
        self.gate_proj, self.up_proj, self.down_proj = fla.gate_proj, fla.up_proj, fla.down_proj
        self.backend, self._configs = backend, {}
        self.train(fla.training)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if (resolve_backend(self.backend, x, self, backward=True) == "triton" and g.dtype in KERNEL_DTYPES
                and u.dtype == g.dtype):
            from momtune.functions import swiglu_op

            I = g.shape[-1]
            a = swiglu_op(self._configs, g.reshape(-1, I), u.reshape(-1, I)).view(g.shape)  # trains on swiglu_bwd
        else:  # fla's swiglu: fp32 inside, the input's dtype out
            cd = torch.promote_types(g.dtype, torch.float32)
            a = (F.silu(g.to(cd)) * u.to(cd)).to(g.dtype)
        return self.down_proj(a)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


MOMTUNE_CLASSES = {FlaMoMAttention: "MomAttention", FlaRMSNorm: "RMSNorm", FlaGatedMLP: "GatedMLP"}


@dataclass
class ApplySummary:
    """What :func:`apply` did: per kind, the fla modules swapped and the momtune modules found
    (from an earlier ``apply``; their backend is set again); the fla modules left alone, by path."""

    backend: str
    swapped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MOMTUNE_CLASSES.values(), 0))
    already: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MOMTUNE_CLASSES.values(), 0))
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.swapped.items())
        text = f"momtune.apply (backend {self.backend!r}): swapped {kinds}"
        if any(self.already.values()):
            text += "; already momtune's: " + ", ".join(f"{k} {n}" for k, n in self.already.items() if n)
        for path, why in self.skipped.items():
            text += f"\n  left alone: {path or '<root>'}: {why}"
        return text


class Applied(NamedTuple):
    """:func:`apply`'s result: the model (the same object, changed in place; a root module that is
    itself swapped comes back as its replacement) and the summary."""

    model: nn.Module
    summary: ApplySummary


def apply(model: nn.Module, backend: str | None = None) -> Applied:
    """Swap, in place, every fla ``MomAttention``, ``RMSNorm`` and ``GatedMLP`` (swish) in ``model``'s
    module tree for momtune's (:class:`FlaMoMAttention`, :class:`FlaRMSNorm`, :class:`FlaGatedMLP`),
    keeping fla's parameters, call signatures and cache (module docstring). ``backend``:
    "auto" | "triton" | "reference" (default: ``MOMTUNE_BACKEND``, else "auto"). Modules it does not
    know are left alone, and so are fla modules momtune cannot compute (named in the summary).
    Idempotent: a second call swaps nothing and sets the backend of the momtune modules it finds.

    >>> model, summary = momtune.apply(fla_model)   # or just momtune.apply(fla_model)
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module (e.g. fla's MomForCausalLM), got {type(model).__name__}")
    backend = check_choice("backend", backend or settings.load().backend, BACKENDS)
    summary = ApplySummary(backend=backend)
    done: dict[int, nn.Module] = {}  # id(fla module) -> its replacement (a module shared by two parents)
    root = _swap(model, "", backend, summary, done)
    if root is None:
        root = model
        _visit(model, "", backend, summary, done)
    return Applied(root, summary)


def _visit(module: nn.Module, prefix: str, backend: str, summary: ApplySummary, done: dict[int, nn.Module]) -> None:
    for name, child in list(module._modules.items()):  # not named_children(): it skips a module's second path
        if child is None:
            continue
        path = f"{prefix}.{name}" if prefix else name
        new = _swap(child, path, backend, summary, done)
        if new is None:
            _visit(child, path, backend, summary, done)
        elif new is not child:
            setattr(module, name, new)


def _swap(module: nn.Module, path: str, backend: str, summary: ApplySummary,
          done: dict[int, nn.Module]) -> nn.Module | None:
    """The module to put at ``path``: its replacement, itself (a momtune module: its backend set),
    or None (not one apply knows, or left alone: look inside it)."""
    kind = MOMTUNE_CLASSES.get(type(module))
    if kind is not None:
        if id(module) not in done:
            done[id(module)] = module
            module.backend = backend
            summary.already[kind] += 1
        return module
    kind = FLA_CLASSES.get((type(module).__module__, type(module).__qualname__))
    if kind is None:
        return None
    if id(module) in done:
        return done[id(module)]
    try:
        new = _convert(kind, module, backend)
    except MomtuneError as e:
        summary.skipped[path] = str(e)
        return None
    done[id(module)] = new
    summary.swapped[kind] += 1
    return new


def _convert(kind: str, module: nn.Module, backend: str) -> nn.Module:
    if kind == "MomAttention":
        return FlaMoMAttention.from_fla(module, backend)
    if kind == "RMSNorm":
        if not isinstance(module.weight, nn.Parameter) or module.bias is not None:
            raise InputError("RMSNorm: momtune's norm has a weight and no bias (elementwise_affine=True, bias=False)")
        return FlaRMSNorm(module, backend)
    if module.hidden_act != "swish" or not all(isinstance(getattr(module, n), nn.Linear)
                                               for n in ("gate_proj", "up_proj", "down_proj")):
        raise InputError(f"GatedMLP: momtune's kernel is SwiGLU (hidden_act 'swish'), got {module.hidden_act!r}")
    return FlaGatedMLP(module, backend)


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
