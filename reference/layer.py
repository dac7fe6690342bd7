"""The reference MoM layer: flash-linear-attention 0.6.0 ``MomAttention`` (eval mode) in plain PyTorch.

Same constructor keywords, parameter names and shapes as fla, so fla checkpoints load strictly.
The math (docs: /work/shared/DESIGN.md, steps 1-6), for x [B, T, D]:

    logits = gate(x) [B, T, E];  (w, idx) = route(logits, topk)            fp32 weights
    shared_mem: one more slot per token, memory E, weight 1 (M = E + 1 memories, J = topk + 1 slots)
    group(idx, M): segment s = b*M + m holds row b's tokens routed to m, in time order
    per packed row of memory m:  q = conv_q(q_proj x)   k = conv_k(k_proj[m] x)   v = conv_v(v_proj[m] x)
                                 beta = sigmoid(b_proj[m] x)   g = -exp(A_log) softplus(a_proj[m] x + dt_bias)
    (the convs run over each segment's own stream; memory E / single_kv_proj use shared_k/v/b/a)
    o_seg = gated delta rule over each segment (q, k L2-normalised, scale K^-1/2)
    y[b, t] = sum_j w[b, t, j] o_seg[slot[b, t, j]]       (merge)
    out = o_proj(gated_rms_norm(y, g_proj x, o_norm.weight))   per head, then heads flattened

Decode: pass a :class:`~momtune.reference.cache.MoMCache`; each segment starts from the cached
state / conv windows of its (b, m) and writes its final ones back (empty segments keep theirs).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from momtune.checks import FLOAT_DTYPES, check_tensor
from momtune.errors import InputError

from .cache import MoMCache
from .norm import gated_rms_norm
from .recurrence import compute_dtype, recurrent_chunked, recurrent_naive
from .routing import group, merge, route
from .conv import short_conv

MODES = ("chunk", "fused_recurrent")
CHUNK_SIZE = 64
#: fla constructor keywords that do not change the math (accepted and ignored).
IGNORED_KWARGS = frozenset({"fuse_conv_l2"})


class GatedRMSNorm(nn.Module):
    """fla ``FusedRMSNormGated`` (swish gate): rms_norm(x) * weight * silu(gate) over the last axis [V]."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)


class MoMAttention(nn.Module):
    """Mixture-of-Memories gated-delta-rule layer (reference). See the module docstring."""

    def __init__(
        self,
        hidden_size: int = 2048,
        head_dim: int = 256,
        num_heads: int = 4,
        expand_v: float = 2,
        mode: str = "chunk",
        use_output_gate: bool = True,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        layer_idx: int | None = None,
        norm_eps: float = 1e-5,
        num_memories: int = 8,
        topk: int = 2,
        capacity: float = 1.0,
        shared_mem: bool = False,
        single_kv_proj: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _check_args(hidden_size, head_dim, num_heads, expand_v, mode, use_output_gate, use_short_conv,
                    conv_size, conv_bias, layer_idx, norm_eps, num_memories, topk, kwargs)
        self.hidden_size, self.head_dim, self.num_heads, self.expand_v = hidden_size, head_dim, num_heads, expand_v
        self.mode, self.conv_size, self.layer_idx, self.norm_eps = mode, conv_size, layer_idx, norm_eps
        self.use_output_gate, self.use_short_conv, self.conv_bias = use_output_gate, use_short_conv, conv_bias
        self.num_memories, self.topk, self.capacity = num_memories, topk, capacity
        self.shared_mem, self.single_kv_proj = bool(shared_mem), bool(single_kv_proj)
        self.head_v_dim = int(round(head_dim * expand_v))
        self.key_dim, self.value_dim = num_heads * head_dim, num_heads * self.head_v_dim
        D, HK, HV, H, E = hidden_size, self.key_dim, self.value_dim, num_heads, num_memories

        def linears(n_out: int) -> nn.ModuleList:
            return nn.ModuleList(nn.Linear(D, n_out, bias=False) for _ in range(E))

        self.q_proj = nn.Linear(D, HK, bias=False)
        self.gate = nn.Linear(D, E, bias=False)
        if not self.single_kv_proj:
            self.k_proj, self.v_proj, self.b_proj, self.a_proj = linears(HK), linears(HV), linears(H), linears(H)
        if self.single_kv_proj or self.shared_mem:
            self.shared_k = nn.Linear(D, HK, bias=False)
            self.shared_v = nn.Linear(D, HV, bias=False)
            self.shared_b = nn.Linear(D, H, bias=False)
            self.shared_a = nn.Linear(D, H, bias=False)
        # fla's init: A ~ U(0, 16), A_log = log A; dt log-uniform in [1e-3, 0.1], floor 1e-4, inverse softplus
        self.A_log = nn.Parameter(torch.empty(H).uniform_(0, 16).log())
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.dt_bias._no_weight_decay = True  # type: ignore[attr-defined]
        # depthwise causal convs; only .weight [C, 1, W] is used (Conv1d for fla's default init)
        self.q_conv1d = nn.Conv1d(HK, HK, conv_size, groups=HK, padding=conv_size - 1, bias=False)
        self.k_conv1d = nn.Conv1d(HK, HK, conv_size, groups=HK, padding=conv_size - 1, bias=False)
        self.v_conv1d = nn.Conv1d(HV, HV, conv_size, groups=HV, padding=conv_size - 1, bias=False)
        self.g_proj = nn.Linear(D, HV, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(HV, D, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, gain=2 ** -2.5)

    @property
    def num_slots(self) -> int:
        """M = E + shared: memories per sequence (the shared one is index E)."""
        return self.num_memories + int(self.shared_mem)

    def memory_linears(self, m: int) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """(k, v, b, a) projections of memory m (m == E is the shared memory)."""
        if self.single_kv_proj or m == self.num_memories:
            return self.shared_k, self.shared_v, self.shared_b, self.shared_a
        return self.k_proj[m], self.v_proj[m], self.b_proj[m], self.a_proj[m]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MoMCache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, MoMCache | None]:
        """hidden_states [B, T, D] -> (o [B, T, D], router_logits [B*T, E], past_key_values).

        With ``past_key_values`` (or ``use_cache=True``, which creates a :class:`MoMCache`), the
        layer starts from the cached state of entry ``layer_idx`` (0 if None) and updates it.
        """
        if "cu_seqlens" in kwargs:
            return self._forward_varlen(hidden_states, attention_mask, past_key_values, use_cache, kwargs)
        x = self._check_inputs(hidden_states, attention_mask, past_key_values, kwargs)
        valid = self._valid_tokens(attention_mask, x)
        B, T, D = x.shape
        E, M, H, K, V, W = self.num_memories, self.num_slots, self.num_heads, self.head_dim, self.head_v_dim, self.conv_size

        router_logits = self.gate(x)  # [B, T, E]
        w, idx = route(router_logits, self.topk)  # [B, T, topk] fp32 (fp64 for fp64), int64
        if self.shared_mem:  # the shared memory is one more slot of every token, weight 1
            idx = torch.cat([idx, idx.new_full((B, T, 1), E)], dim=-1)
            w = torch.cat([w, torch.ones_like(w[..., :1])], dim=-1)
        if valid is not None:  # padding joins no memory and reads nothing
            w = w * valid[:, :, None]
        grouping = group(idx, M, valid)  # segment s = b*M + m, time order inside
        cu = grouping.cu_seqlens
        n_rows = B * T * idx.shape[-1]
        n_seg = n_rows if valid is None else int(cu[-1])  # rows in segments (masked ones follow)
        xp = x.reshape(B * T, D)[grouping.token_index[:n_seg]]  # [Np, D], Np = B*T*J without padding
        row_mem = torch.repeat_interleave(torch.arange(B * M, device=x.device) % M, cu.diff())  # [Np]

        cache = MoMCache() if past_key_values is None and use_cache else past_key_values
        entry = None
        if cache is not None:
            entry = cache.get_or_create(
                self._cache_key, batch_size=B, num_slots=M, num_heads=H, head_k=K, head_v=V, conv_size=W,
                state_dtype=compute_dtype(x.dtype), window_dtype=x.dtype, device=x.device)

        def window(t: torch.Tensor | None) -> torch.Tensor | None:  # [B, M, W-1, C] -> [B*M, W-1, C]
            return None if t is None else t.reshape(B * M, W - 1, t.shape[-1])

        wq0, wk0, wv0 = (None, None, None) if entry is None else (entry.conv_q, entry.conv_k, entry.conv_v)
        k_in, v_in, b_in, a_in = self._project_memories(xp, row_mem)
        q, win_q = short_conv(self.q_proj(xp), self.q_conv1d.weight, cu, window(wq0))  # [Np, H*K]
        k, win_k = short_conv(k_in, self.k_conv1d.weight, cu, window(wk0))
        v, win_v = short_conv(v_in, self.v_conv1d.weight, cu, window(wv0))  # [Np, H*V]
        beta = b_in.sigmoid()  # [Np, H]
        cd = torch.promote_types(x.dtype, torch.float32)
        g = -self.A_log.to(cd).exp() * F.softplus(a_in.to(cd) + self.dt_bias.to(cd))  # [Np, H], <= 0

        state0 = None if entry is None else entry.state.reshape(B * M, H, K, V)
        args = (q.view(-1, H, K), k.view(-1, H, K), v.view(-1, H, V), g, beta)
        opts: dict[str, Any] = dict(cu_seqlens=cu, rule="gated_delta", initial_state=state0, use_qk_l2norm=True)
        if self.mode == "chunk":
            o, final = recurrent_chunked(*args, **opts, chunk_size=CHUNK_SIZE)
        else:
            o, final = recurrent_naive(*args, **opts)
        if cache is not None:
            cache.update(self._cache_key, final.reshape(B, M, H, K, V), win_q.reshape(B, M, W - 1, H * K),
                         win_k.reshape(B, M, W - 1, H * K), win_v.reshape(B, M, W - 1, H * V), T)

        if n_seg < n_rows:  # the rows of masked tokens read as zeros (their weights are 0 too)
            o = torch.cat([o, o.new_zeros(n_rows - n_seg, *o.shape[1:])])
        y = merge(o, grouping.slot, w)  # [B, T, H, V]
        y = self.o_norm(y, self.g_proj(x).view(B, T, H, V))
        return self.o_proj(y.reshape(B, T, H * V)), router_logits.reshape(B * T, E), cache

    # ------------------------------------------------------------------ helpers
    @property
    def _cache_key(self) -> int:
        return 0 if self.layer_idx is None else self.layer_idx

    def _project_memories(self, xp: torch.Tensor, row_mem: torch.Tensor) -> list[torch.Tensor]:
        """k, v, b, a pre-activations [Np, H*K], [Np, H*V], [Np, H], [Np, H]: row r uses memory row_mem[r]."""
        widths = (self.key_dim, self.value_dim, self.num_heads, self.num_heads)
        outs = [xp.new_zeros(xp.shape[0], n) for n in widths]
        for m in range(self.num_slots):
            rows = (row_mem == m).nonzero().squeeze(1)
            if rows.numel():
                xm = xp[rows]
                outs = [o.index_copy(0, rows, lin(xm)) for o, lin in zip(outs, self.memory_linears(m))]
        return outs

    def _check_inputs(self, x: object, attention_mask: object, cache: object, kwargs: dict,
                      values: bool = True) -> torch.Tensor:
        """Metadata checks, and with ``values`` that hidden_states is finite (a host sync)."""
        if kwargs:
            raise InputError(f"forward: unsupported keyword arguments {sorted(kwargs)} (accepted: attention_mask, "
                             "past_key_values, use_cache, output_attentions, cu_seqlens)")
        if cache is not None and not isinstance(cache, MoMCache):
            raise InputError(f"past_key_values: expected a MoMCache or None, got {type(cache).__name__}")
        check_tensor("hidden_states", x, ndim=3, dtypes=FLOAT_DTYPES)
        assert isinstance(x, torch.Tensor)
        if x.shape[-1] != self.hidden_size:
            raise InputError(f"hidden_states: last dim must be hidden_size {self.hidden_size}, got shape {list(x.shape)}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise InputError(f"hidden_states: needs at least one row and one token, got shape {list(x.shape)}")
        if x.dtype != self.q_proj.weight.dtype:
            raise InputError(f"hidden_states: dtype {x.dtype} differs from the layer's parameters "
                             f"({self.q_proj.weight.dtype}); convert one of them")
        if values:
            check_tensor("hidden_states", x, finite=True)
        return x

    def _forward_varlen(self, x: object, attention_mask: object, cache: object, use_cache: bool,
                        kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, MoMCache | None]:
        """Packed sequences (fla's ``cu_seqlens``): hidden_states [1, N, D] holds sequence i at
        rows cu_seqlens[i]:cu_seqlens[i+1]. They run as padded rows [S, max length] with an
        attention mask (the cache, if any, holds one row per sequence) and come back packed:
        (o [1, N, D], router_logits [N, E], cache). Reads cu_seqlens on the host."""
        cu, T, kwargs = self._packed_input(x, attention_mask, kwargs)
        assert isinstance(x, torch.Tensor)
        N, D = x.shape[1], x.shape[2]
        S = cu.numel() - 1
        rows = torch.arange(N, device=x.device)
        seq = torch.searchsorted(cu[1:], rows, right=True)
        pos = rows - cu[seq]
        padded = x.new_zeros(S, T, D)
        padded[seq, pos] = x[0]
        mask = torch.zeros(S, T, dtype=torch.bool, device=x.device)
        mask[seq, pos] = True
        o, logits, cache = self(padded, mask, cache, use_cache, **kwargs)
        return o[seq, pos][None], logits.view(S, T, -1)[seq, pos], cache

    def _packed_input(self, x: object, attention_mask: object, kwargs: dict) -> tuple[torch.Tensor, int, dict]:
        """Checks of packed input: (cu_seqlens as int64 on x's device, the longest sequence (at
        least 1; read on the host), the other keyword arguments)."""
        from momtune.checks import check_cu_seqlens

        kwargs = dict(kwargs)
        cu = kwargs.pop("cu_seqlens")
        if attention_mask is not None:
            raise InputError("attention_mask: give either attention_mask (padded rows) or cu_seqlens (packed "
                             "sequences), not both")
        check_tensor("hidden_states", x, ndim=3, dtypes=FLOAT_DTYPES)
        assert isinstance(x, torch.Tensor)
        if x.shape[0] != 1:
            raise InputError(f"hidden_states: with cu_seqlens the sequences are packed along dim 1; expected "
                             f"shape [1, N, D], got {list(x.shape)}")
        cu = check_cu_seqlens("cu_seqlens", cu, x.shape[1]).to(x.device, torch.int64)
        return cu, max(1, int((cu[1:] - cu[:-1]).max())), kwargs

    def _valid_tokens(self, attention_mask: object, x: torch.Tensor) -> torch.Tensor | None:
        """The padding mask of the current tokens as bool [B, T] (None: all valid). As fla's
        MomAttention: attention_mask [B, T'] with T' >= T, its last T columns cover these tokens,
        1 (or True) marks a real token; a padded token joins no memory and its output is 0."""
        if attention_mask is None:
            return None
        B, T = x.shape[0], x.shape[1]
        check_tensor("attention_mask", attention_mask, ndim=2)
        assert isinstance(attention_mask, torch.Tensor)
        if attention_mask.shape[0] != B or attention_mask.shape[1] < T:
            raise InputError(f"attention_mask: expected shape [{B}, T'] with T' >= {T} (the last {T} columns "
                             f"cover these tokens), got {list(attention_mask.shape)}")
        if attention_mask.device != x.device:
            raise InputError(f"attention_mask: on {attention_mask.device}, hidden_states on {x.device}")
        m = attention_mask[:, attention_mask.shape[1] - T:]
        return m if m.dtype == torch.bool else m == 1

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"head_v_dim={self.head_v_dim}, num_memories={self.num_memories}, topk={self.topk}, "
                f"shared_mem={self.shared_mem}, single_kv_proj={self.single_kv_proj}, mode={self.mode!r}")


def _check_args(hidden_size, head_dim, num_heads, expand_v, mode, use_output_gate, use_short_conv, conv_size,
                conv_bias, layer_idx, norm_eps, num_memories, topk, kwargs) -> None:
    from momtune.checks import check_choice, check_int

    for name, value in (("hidden_size", hidden_size), ("head_dim", head_dim), ("num_heads", num_heads),
                        ("conv_size", conv_size), ("num_memories", num_memories)):
        check_int(name, value, lo=1)
    check_int("topk", topk, lo=1, hi=num_memories)
    if layer_idx is not None:
        check_int("layer_idx", layer_idx, lo=0)
    check_choice("mode", mode, MODES)
    if isinstance(expand_v, bool) or not isinstance(expand_v, (int, float)) or not expand_v > 0:
        raise InputError(f"expand_v: expected a number > 0, got {expand_v!r}")
    v = head_dim * expand_v
    if abs(v - round(v)) > 1e-9 or round(v) < 1:
        raise InputError(f"expand_v: head_dim * expand_v = {head_dim} * {expand_v} = {v:g} is not a positive "
                         "integer; the per-head value dim (and so value_dim = num_heads * it) must be integral")
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
        raise InputError(f"norm_eps: expected a number > 0, got {norm_eps!r}")
    for name, value, ok in (("use_short_conv", use_short_conv, True), ("use_output_gate", use_output_gate, True),
                            ("conv_bias", conv_bias, False)):
        if value is not ok:
            raise InputError(f"{name}: only {ok} is supported by the momtune reference, got {value!r}")
    unknown = sorted(set(kwargs) - IGNORED_KWARGS)
    if unknown:
        raise InputError(f"MoMAttention: unknown keyword arguments {unknown}; accepted extras: {sorted(IGNORED_KWARGS)}")
