"""Pure-PyTorch reference of Mixture-of-Memories (MoM) linear attention: the ground truth.

Installed as ``momtune.reference``. Nothing here imports Triton. Import cost is kept low:
submodules load on first attribute access.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "recurrent_naive": "recurrence",
    "recurrent_chunked": "recurrence",
    "l2norm": "recurrence",
    "route": "routing",
    "group": "routing",
    "merge": "routing",
    "Grouping": "routing",
    "short_conv": "conv",
    "conv_step": "conv",
    "rms_norm": "norm",
    "gated_rms_norm": "norm",
    "MoMAttention": "layer",
    "MoMConfig": "config",
    "MoMForCausalLM": "model",
    "MoMCache": "cache",
    "load_balancing_loss": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        mod = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
