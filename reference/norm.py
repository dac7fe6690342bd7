"""RMSNorm and the gated RMSNorm of MoM's output (computed in fp32, or float64 for float64)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] * rsqrt(mean(x^2) + eps) * weight [D], in x's dtype."""
    cd = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(cd)
    return y.to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x) * weight * silu(gate); x, gate [..., D]."""
    cd = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(cd)
    return (y * F.silu(gate.to(cd))).to(x.dtype)
