"""Causal depthwise short convolution + SiLU, run per segment with its own history.

Weights are [C, W] (fla's Conv1d weight [C, 1, W] squeezed); weight[:, W-1] multiplies the
current token. Windows (the last W-1 inputs of a segment, most recent last) are [.., W-1, C];
a segment with no window starts from zeros, so nothing leaks across segments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    initial_window: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, C] packed segments -> (silu(conv(x)) [N, C], final windows [S, W-1, C])."""
    N, C = x.shape
    W = weight.shape[-1]
    weight = weight.reshape(C, W)
    cu = [0, N] if cu_seqlens is None else [int(c) for c in cu_seqlens.tolist()]
    S = len(cu) - 1
    if initial_window is None:
        initial_window = x.new_zeros(S, W - 1, C)
    ys, windows = [], []
    for s in range(S):
        seg = torch.cat([initial_window[s].to(x.dtype), x[cu[s]:cu[s + 1]]])  # [W-1+L, C]
        if cu[s + 1] > cu[s]:  # an empty segment has no output (and F.conv1d rejects it)
            y = F.conv1d(seg.t()[None].to(weight.dtype), weight[:, None, :], groups=C)[0].t()  # [L, C]
            ys.append(F.silu(y).to(x.dtype))
        windows.append(seg[seg.shape[0] - (W - 1):])
    y = torch.cat(ys) if ys else x[:0]
    return y, torch.stack(windows) if windows else initial_window


def conv_step(
    x: torch.Tensor, window: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. x [B, C], window [B, W-1, C] -> (y [B, C], new window [B, W-1, C])."""
    C = x.shape[-1]
    W = weight.shape[-1]
    full = torch.cat([window.to(x.dtype), x[:, None]], dim=1)  # [B, W, C]
    y = (full.to(weight.dtype) * weight.reshape(C, W).t()[None]).sum(1)
    return F.silu(y).to(x.dtype), full[:, 1:]
