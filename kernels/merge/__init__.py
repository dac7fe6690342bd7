"""merge kernels: weighted sum of the packed per-memory read-outs (+ fused gated RMSNorm)."""
from __future__ import annotations

from .merge import merge_prefill

__all__ = ["merge_prefill"]
