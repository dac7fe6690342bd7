"""Subcommands of the momtune CLI (one module each), and the argument types they share: a bad
value stops at parsing with the flag, the value and what is accepted (exit 2), instead of
spinning, silently meaning something else, or failing later with a traceback."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

SEED_MAX = 2**32 - 1  # numpy's and Optuna's samplers take seeds in 0 .. 2**32 - 1


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in lo .. hi (no upper limit if hi is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"in {lo} .. {hi}"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text}")
    return value


def finite(obj: object) -> object:
    """``obj`` with NaN and infinities as None (JSON has neither)."""
    import builtins  # this package's submodule `list` shadows the builtin here
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (builtins.list, tuple)):
        return [finite(v) for v in obj]
    return obj
