"""norm kernels: RMSNorm with the residual add fused in (the LM block's attn_norm / mlp_norm)."""
from __future__ import annotations

from .norm import add_rms_norm

__all__ = ["add_rms_norm"]
