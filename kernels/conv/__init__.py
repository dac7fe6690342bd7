"""conv kernels: fused gather + causal depthwise short conv (+SiLU) over packed segments, and
the fused gather of the decay / beta gates."""
from __future__ import annotations

from .conv import gate_prep, segment_conv

__all__ = ["gate_prep", "segment_conv"]
