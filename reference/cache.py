"""Decode cache of the reference MoM layers: fixed-size per layer, whatever the sequence length.

Per layer (M = E + shared memories per sequence; the shared memory, if any, is index E):

    state   [B, M, H, K, V]    recurrent state of each (sequence, memory); float32 (float64 for
                               a float64 model); zeros = nothing seen yet
    conv_q  [B, M, W-1, H*K]   last W-1 inputs of the q short conv of each memory's own stream,
    conv_k  [B, M, W-1, H*K]   most recent last, in the model dtype (zeros = empty history)
    conv_v  [B, M, W-1, H*V]
    seen_tokens                tokens this layer has processed

``state.reshape(B*M, H, K, V)`` is the initial / final state of segment ``s = b*M + m`` of the
packed layout (see docs/CONVENTIONS.md), so the fast path shares this cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from momtune.errors import InputError


@dataclass
class LayerCache:
    """The cached tensors of one layer (shapes in the module docstring)."""

    state: torch.Tensor
    conv_q: torch.Tensor
    conv_k: torch.Tensor
    conv_v: torch.Tensor
    seen_tokens: int = 0

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]


class MoMCache:
    """Per-layer decode state, allocated lazily by each layer on first use (keyed by layer_idx)."""

    def __init__(self) -> None:
        self.layers: dict[int, LayerCache] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, layer_idx: object) -> bool:
        return layer_idx in self.layers

    def __getitem__(self, layer_idx: int) -> LayerCache:
        if layer_idx not in self.layers:
            raise InputError(f"layer_idx: {layer_idx} has no cache entry; cached layers are {sorted(self.layers)}")
        return self.layers[layer_idx]

    @property
    def seen_tokens(self) -> int:
        """Tokens processed so far (by the lowest cached layer; 0 when empty)."""
        return self.layers[min(self.layers)].seen_tokens if self.layers else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed so far by ``layer_idx`` (0 if it has no entry yet)."""
        return self.layers[layer_idx].seen_tokens if layer_idx in self.layers else 0

    @property
    def batch_size(self) -> int | None:
        return next(iter(self.layers.values())).batch_size if self.layers else None

    def reset(self) -> None:
        """Forget every layer (the next forward starts from empty history)."""
        self.layers.clear()

    def get_or_create(
        self,
        layer_idx: int,
        *,
        batch_size: int,
        num_slots: int,
        num_heads: int,
        head_k: int,
        head_v: int,
        conv_size: int,
        state_dtype: torch.dtype,
        window_dtype: torch.dtype,
        device: torch.device,
    ) -> LayerCache:
        """The entry of ``layer_idx``, zero-initialised on first use; checks the batch size and shapes."""
        if layer_idx in self.layers:
            entry = self.layers[layer_idx]
            if entry.batch_size != batch_size:
                raise InputError(
                    f"past_key_values: cache holds batch size {entry.batch_size} but hidden_states has batch "
                    f"size {batch_size}; use a fresh MoMCache per batch")
            want = (batch_size, num_slots, num_heads, head_k, head_v)
            if tuple(entry.state.shape) != want or entry.conv_q.shape[2] != conv_size - 1:
                raise InputError(
                    f"past_key_values: layer {layer_idx} cache has state shape {list(entry.state.shape)} and "
                    f"conv window {entry.conv_q.shape[2]}, this layer needs {list(want)} and {conv_size - 1}")
            return entry
        B, M, W1 = batch_size, num_slots, conv_size - 1
        entry = LayerCache(
            state=torch.zeros(B, M, num_heads, head_k, head_v, dtype=state_dtype, device=device),
            conv_q=torch.zeros(B, M, W1, num_heads * head_k, dtype=window_dtype, device=device),
            conv_k=torch.zeros(B, M, W1, num_heads * head_k, dtype=window_dtype, device=device),
            conv_v=torch.zeros(B, M, W1, num_heads * head_v, dtype=window_dtype, device=device),
        )
        self.layers[layer_idx] = entry
        return entry

    def update(
        self,
        layer_idx: int,
        state: torch.Tensor,
        conv_q: torch.Tensor,
        conv_k: torch.Tensor,
        conv_v: torch.Tensor,
        num_tokens: int,
    ) -> None:
        """Store the final state / windows of ``layer_idx`` after ``num_tokens`` more tokens."""
        entry = self[layer_idx]
        entry.state, entry.conv_q, entry.conv_k, entry.conv_v = state, conv_q, conv_k, conv_v
        entry.seen_tokens += num_tokens

    def __repr__(self) -> str:
        return f"MoMCache(layers={sorted(self.layers)}, batch_size={self.batch_size}, seen_tokens={self.seen_tokens})"
