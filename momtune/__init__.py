"""momtune: autotuned Triton kernels for Mixture-of-Memories (MoM) linear attention.

Public API (loaded lazily, so ``import momtune`` does no work):
``MoMAttention``, ``MoMForCausalLM`` (fast, ``backend="auto"|"triton"|"reference"``),
``MoMConfig``, ``apply`` (a loaded fla MoM model made fast in place: :mod:`momtune.fla_compat`),
and the error hierarchy in :mod:`momtune.errors`.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MoMAttention": "momtune.model",
    "MoMForCausalLM": "momtune.lm",
    "MoMConfig": "momtune.reference.config",
    "MomtuneError": "momtune.errors",
    "apply": "momtune.fla_compat",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


_SUBMODULES = ("reference", "kernels")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # ``momtune.reference.X`` works without importing it first
        return importlib.import_module(f"momtune.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'momtune' has no attribute {name!r}")
