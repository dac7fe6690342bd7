"""The one place that reads MOMTUNE_* environment variables; bad values are rejected with the
list of valid ones.

    MOMTUNE_BACKEND   auto | triton | reference      default backend of the fast model (auto)
    MOMTUNE_LIBRARY   path to a tuned library JSON,  (unset or auto: the library momtune ships for
                      auto or none                   this GPU and Triton major.minor, else defaults;
                                                     none: the defaults of each template)
    MOMTUNE_POLICY    strict | warn | ignore         provenance mismatch policy (warn)
    MOMTUNE_STORAGE   Optuna storage URL             (sqlite:///momtune.db)
    MOMTUNE_OUT       output folder of the main job  (out)
    MOMTUNE_CHECKS    auto | full | shapes           input checks of the fast model (auto): full
                                                     also checks values (hidden_states finite: a
                                                     host sync per layer call), shapes only checks
                                                     metadata, auto = full on CPU, shapes on CUDA
    MOMTUNE_FP32_PRECISION  auto | ieee | tf32       the kernels' float32 dots for float32 inputs
                                                     (auto: as torch's float32 matmuls, i.e. TF32
                                                     only where torch.backends.cuda.matmul.allow_tf32)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError

BACKENDS = ("auto", "triton", "reference")
POLICIES = ("strict", "warn", "ignore")
CHECKS = ("auto", "full", "shapes")
FP32_PRECISIONS = ("auto", "ieee", "tf32")


def _choice(var: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(var, default).strip().lower()
    if value not in choices:
        raise ConfigError(f"{var}={value!r} is not accepted; use one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Settings:
    backend: str
    library: str | None
    policy: str
    storage: str
    out: str
    checks: str = "auto"


def load() -> Settings:
    """Read the environment now (not at import time)."""
    return Settings(
        backend=_choice("MOMTUNE_BACKEND", "auto", BACKENDS),
        library=os.environ.get("MOMTUNE_LIBRARY") or None,
        policy=_choice("MOMTUNE_POLICY", "warn", POLICIES),
        storage=os.environ.get("MOMTUNE_STORAGE", "sqlite:///momtune.db"),
        out=os.environ.get("MOMTUNE_OUT", "out"),
        checks=_choice("MOMTUNE_CHECKS", "auto", CHECKS),
    )


def fp32_uses_tf32() -> bool:
    """Whether the kernels' float32 dots run in TF32 for float32 inputs: MOMTUNE_FP32_PRECISION
    (ieee, tf32), or with ``auto`` (the default) what torch does for float32 matmuls. bf16/fp16
    inputs always accumulate their float32 dots in TF32 (their own rounding is coarser)."""
    choice = _choice("MOMTUNE_FP32_PRECISION", "auto", FP32_PRECISIONS)
    if choice == "auto":
        import torch

        return bool(torch.backends.cuda.matmul.allow_tf32)
    return choice == "tf32"


def interpreter_mode() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
