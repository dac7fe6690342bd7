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
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError

BACKENDS = ("auto", "triton", "reference")
POLICIES = ("strict", "warn", "ignore")
CHECKS = ("auto", "full", "shapes")


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


def interpreter_mode() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
