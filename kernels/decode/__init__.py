"""Decode step of one MoM layer (one new token per sequence) as fused Triton kernels.

``decode_step`` lives in :mod:`momtune.kernels.decode.step` (imported lazily: importing this
package compiles and imports nothing); the tuning template is ``template.TEMPLATE``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["decode_step"]


def __getattr__(name: str) -> Any:
    if name == "decode_step":
        from .step import decode_step

        return decode_step
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
