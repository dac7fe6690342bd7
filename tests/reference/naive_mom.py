"""An independent, token-by-token MoM layer used as the oracle of the reference layer tests.

It reads only the layer's parameters and re-derives every step with explicit loops (no
momtune.reference routing / grouping / conv / recurrence code): per token, the routed memories
(plus the shared one) each advance their own conv windows and state, and the read-outs are mixed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def memory_weights(layer, m: int) -> tuple[torch.Tensor, ...]:
    """(Wk, Wv, Wb, Wa) of memory m, chosen by fla parameter names (m == E: shared)."""
    if layer.single_kv_proj or m == layer.num_memories:
        return layer.shared_k.weight, layer.shared_v.weight, layer.shared_b.weight, layer.shared_a.weight
    return layer.k_proj[m].weight, layer.v_proj[m].weight, layer.b_proj[m].weight, layer.a_proj[m].weight


def _conv(window: torch.Tensor, u: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """window [W-1, C] (most recent last), u [C], weight [C, 1, W] -> (silu(conv) [C], new window)."""
    full = torch.cat([window, u[None]])  # [W, C]
    return F.silu((full * weight[:, 0, :].t()).sum(0)), full[1:]


@torch.no_grad()
def naive_mom_layer(layer, x: torch.Tensor, start: dict | None = None) -> tuple[torch.Tensor, dict]:
    """x [B, T, D] float64 -> (o [B, T, D], end) with end = {state [B,M,H,K,V], conv_q/k/v [B,M,W-1,C]}.

    ``start`` (same keys) continues from a previous call.
    """
    B, T, D = x.shape
    E, H, K, V, W = layer.num_memories, layer.num_heads, layer.head_dim, layer.head_v_dim, layer.conv_size
    M = E + int(layer.shared_mem)
    st = {"state": x.new_zeros(B, M, H, K, V), "conv_q": x.new_zeros(B, M, W - 1, H * K),
          "conv_k": x.new_zeros(B, M, W - 1, H * K), "conv_v": x.new_zeros(B, M, W - 1, H * V)}
    if start is not None:
        st = {k: v.clone() for k, v in start.items()}
    y = x.new_zeros(B, T, H, V)
    for b in range(B):
        for t in range(T):
            xt = x[b, t]
            p = torch.softmax(layer.gate.weight @ xt, dim=0)
            top = sorted(range(E), key=lambda e: -float(p[e]))[: layer.topk]
            total = sum(float(p[e]) for e in top)
            slots = [(e, float(p[e]) / total) for e in top] + ([(E, 1.0)] if layer.shared_mem else [])
            for m, wt in slots:
                Wk, Wv, Wb, Wa = memory_weights(layer, m)
                q, st["conv_q"][b, m] = _conv(st["conv_q"][b, m], layer.q_proj.weight @ xt, layer.q_conv1d.weight)
                k, st["conv_k"][b, m] = _conv(st["conv_k"][b, m], Wk @ xt, layer.k_conv1d.weight)
                v, st["conv_v"][b, m] = _conv(st["conv_v"][b, m], Wv @ xt, layer.v_conv1d.weight)
                q, k, v = q.view(H, K), k.view(H, K), v.view(H, V)
                beta = torch.sigmoid(Wb @ xt)
                g = -layer.A_log.exp() * F.softplus(Wa @ xt + layer.dt_bias)
                for h in range(H):
                    qh = q[h] / torch.sqrt((q[h] ** 2).sum() + 1e-6)
                    kh = k[h] / torch.sqrt((k[h] ** 2).sum() + 1e-6)
                    S = st["state"][b, m, h] * torch.exp(g[h])
                    S = S + torch.outer(kh, beta[h] * (v[h] - S.t() @ kh))
                    st["state"][b, m, h] = S
                    y[b, t, h] += wt * K ** -0.5 * (S.t() @ qh)
    gate = (x @ layer.g_proj.weight.t()).view(B, T, H, V)
    y = y / torch.sqrt((y ** 2).mean(-1, keepdim=True) + layer.norm_eps) * layer.o_norm.weight * F.silu(gate)
    return y.reshape(B, T, H * V) @ layer.o_proj.weight.t(), st
