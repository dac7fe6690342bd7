"""swiglu kernel: the LM block's MLP activation silu(gate) * up."""
from __future__ import annotations

from .swiglu import swiglu

__all__ = ["swiglu"]
