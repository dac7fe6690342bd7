"""The fast causal LM: the reference LM (fla's names and outputs) with every block on Triton.

One block, x [N = B*T, D] on the Triton backend:

    norm      h = rms_norm(x)                               (attn_norm)
    attn      o = MoMAttention(h)                           (:mod:`momtune.model`)
    norm      x' = x + o, h' = rms_norm(x')                 (mlp_norm, the residual add fused in)
    GEMMs     g = h' W_gate^T, u = h' W_up^T
    swiglu    a = silu(g) * u
    addmm     x'' = x' + a W_down^T                         (the residual add inside the GEMM)

so a decode step of one block is 12 launches (6 of them the attention's) where the reference's
PyTorch ops take over 30, and ``generate`` replays the whole model step as one CUDA graph (its loop
checks for "every row emitted EOS" on the device and reads that flag on the host every 16 steps).

Nothing here caches a weight: norms and MLP weights are read at every call, the attention keeps
its projection weights as views of its fused weight (:mod:`momtune.model`), and the CUDA graph is
captured anew by each ``generate`` call, so a weight changed between calls is always seen.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from momtune import settings
from momtune.checks import check_choice
from momtune.errors import InputError
from momtune.functions import rms_norm_op, swiglu_op
from momtune.model import BACKENDS, MoMAttention, resolve_backend
from momtune.reference import model as ref_model
from momtune.reference.cache import MoMCache
from momtune.reference.config import MoMConfig
from momtune.reference.generate import GenerateArgs


class RMSNorm(ref_model.RMSNorm):
    """The reference RMSNorm (the same parameter) on the ``norm`` kernel for the Triton backend."""

    @classmethod
    def wrap(cls, ref: ref_model.RMSNorm, backend: str) -> RMSNorm:
        """A fast RMSNorm holding ``ref``'s weight (no copy, no re-init)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.eps, self.weight, self.backend, self._configs = ref.eps, ref.weight, backend, {}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve_backend(self.backend, x, self, backward=True) == "reference":
            return super().forward(x)
        D = x.shape[-1]
        x2 = x.reshape(-1, D)
        return rms_norm_op(self._configs, x2, self.weight, self.eps, None)[0].view(x.shape)


class MoMBlock(ref_model.MoMBlock):
    """The reference block (same parameters) with the fast attention; on the Triton backend the
    norms, the residual adds and the SwiGLU activation run as fused kernels too."""

    @classmethod
    def wrap(cls, ref: ref_model.MoMBlock, backend: str) -> MoMBlock:
        """A fast block sharing ``ref``'s norms and MLP (no copy, no re-init); its attention is
        rebuilt as :class:`momtune.MoMAttention` with ``ref.attn``'s weights."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.attn_norm, self.mlp_norm, self.mlp = ref.attn_norm, ref.mlp_norm, ref.mlp
        self.attn = MoMAttention.wrap(ref.attn, backend)
        self.backend, self._configs = backend, {}
        return self

    def forward(self, x: torch.Tensor, cache: MoMCache | None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # the norms and SwiGLU have backward kernels; the attention decides for itself (a prefill
        # without a cache trains on its kernels; with a cache, 'auto' runs its reference)
        if resolve_backend(self.backend, x, self, backward=True) == "reference":
            return super().forward(x, cache, attention_mask)
        B, T, D = x.shape
        N, mlp = B * T, self.mlp
        x2 = x.reshape(N, D)
        h, _ = rms_norm_op(self._configs, x2, self.attn_norm.weight, self.attn_norm.eps, None)
        o, router_logits, _ = self.attn(h.view(B, T, D), attention_mask, past_key_values=cache)
        h, x2 = rms_norm_op(self._configs, o.reshape(N, D), self.mlp_norm.weight, self.mlp_norm.eps, x2)
        a = swiglu_op(self._configs, F.linear(h, mlp.gate_proj.weight), F.linear(h, mlp.up_proj.weight))
        return torch.addmm(x2, a, mlp.down_proj.weight.t()).view(B, T, D), router_logits


class MoMForCausalLM(ref_model.MoMForCausalLM):
    """The causal LM on fast layers: same config, state_dict names (fla's) and outputs as the
    reference; ``backend`` as :class:`MoMAttention`. ``generate`` captures the decode step of the
    whole model in a CUDA graph on CUDA (``cuda_graph=False`` to turn it off). Blocks and the final
    norm are :class:`MoMBlock` / :class:`RMSNorm` (their parameters are the reference's)."""

    def __init__(self, config: MoMConfig, backend: str | None = None) -> None:
        super().__init__(config)
        self.backend = check_choice("backend", backend or settings.load().backend, BACKENDS)
        layers = self.model.layers
        for i, block in enumerate(layers):  # the reference init, on fast modules
            layers[i] = MoMBlock.wrap(block, self.backend)
        self.model.norm = RMSNorm.wrap(self.model.norm, self.backend)

    def _step_logits(self, ids: torch.Tensor, cache: MoMCache) -> torch.Tensor:
        """One decode step without host-side checks (capturable): ids [B, 1] -> logits [B, vocab]."""
        x = self.model.embeddings(ids)
        for block in self.model.layers:
            x, _ = block(x, cache)
        return self.lm_head(self.model.norm(x))[:, -1]

    #: ``generate`` on the device: the host checks for "every row finished" every 16 steps only.
    generate_sync_every = 16
    generate_extras = {"cuda_graph": True}
    pretrained_extras = ("backend",)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, backend: str | None = None,
                        dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                        **kwargs: Any) -> MoMForCausalLM:
        """The reference's ``from_pretrained`` (an fla-format folder: config.json + model.safetensors)
        on fast layers; ``backend`` as the constructor's."""
        return super().from_pretrained(path, backend=backend, dtype=dtype, device=device, **kwargs)

    def _decoder(self, input_ids: torch.Tensor, args: GenerateArgs) -> tuple[
            Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """The reference's decoder; on CUDA with the Triton backend (and ``cuda_graph``, the default)
        the decode step of the whole model runs as one CUDA graph replay (the cache updated in place)."""
        cuda_graph = args.extras["cuda_graph"]
        if not isinstance(cuda_graph, bool):
            raise InputError(f"cuda_graph: expected True or False, got {cuda_graph!r}")
        if not (cuda_graph and input_ids.is_cuda and args.max_new_tokens > 1
                and resolve_backend(self.backend, self.lm_head.weight) == "triton"):
            return super()._decoder(input_ids, args)
        cache, graph = MoMCache(), []

        def start() -> torch.Tensor:
            logits = self(input_ids, past_key_values=cache, attention_mask=args.attention_mask).logits[:, -1]
            graph.append(DecodeGraph(self, cache, input_ids.shape[0], input_ids.dtype))
            return logits

        return start, lambda ids: graph[0].step(ids)


class DecodeGraph:
    """A captured decode step of the whole model over a fixed cache (in-place updates).

    ``step(ids [B, 1])`` copies the ids into the static input, replays the graph and returns the
    static logits [B, vocab] (valid until the next step)."""

    def __init__(self, model: MoMForCausalLM, cache: MoMCache, batch_size: int, dtype: torch.dtype) -> None:
        self.model, self.cache = model, cache
        device = model.lm_head.weight.device
        self.ids = torch.zeros(batch_size, 1, dtype=dtype, device=device)
        # warm up on a side stream (compiles kernels, fills dispatch caches) on a scratch copy of the cache
        snapshot = {i: (e.state.clone(), e.conv_q.clone(), e.conv_k.clone(), e.conv_v.clone(), e.seen_tokens)
                    for i, e in cache.layers.items()}
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                model._step_logits(self.ids, cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model._step_logits(self.ids, cache)
        for i, (s, q, k, v, seen) in snapshot.items():  # undo warm-up and capture side effects
            e = cache.layers[i]
            e.state.copy_(s), e.conv_q.copy_(q), e.conv_k.copy_(k), e.conv_v.copy_(v)
            e.seen_tokens = seen

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        for e in self.cache.layers.values():
            e.seen_tokens += 1
        return self.logits
