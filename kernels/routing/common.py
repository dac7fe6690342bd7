"""Helpers shared by the routing, merge and conv kernels: configs, devices, output buffers."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from momtune.checks import check_tensor
from momtune.errors import ConfigError, InputError, KernelError

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve_config(config: Mapping[str, Any] | None, defaults: Mapping[str, int], op: str) -> dict[str, int]:
    """defaults overridden by ``config``; unknown keys or non power-of-two sizes raise ConfigError."""
    cfg = dict(defaults)
    if config:
        unknown = sorted(set(config) - set(defaults))
        if unknown:
            raise ConfigError(f"{op} config: unknown keys {unknown}; accepted keys: {sorted(defaults)}")
        cfg.update(config)
    for key, val in cfg.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < 1 or val & (val - 1):
            raise ConfigError(f"{op} config: {key}={val!r} must be a positive power of two")
    return cfg


def require_triton_device(*tensors: torch.Tensor) -> None:
    from momtune.settings import interpreter_mode

    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise InputError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if dev.type != "cuda" and not interpreter_mode():
        raise KernelError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1); got device {dev}")


def output_tensor(out: Any, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The preallocated output ``out`` (a tensor, or a mapping / named tuple holding ``name``),
    checked for shape, dtype, device and contiguity; a fresh empty tensor when none is given."""
    if isinstance(out, torch.Tensor):
        t, label = out, name
    else:
        label = f"out.{name}"
        t = None if out is None else (out.get(name) if isinstance(out, Mapping) else getattr(out, name, None))
    if t is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_tensor(label, t, shape=shape, dtypes=(dtype,))
    if t.device != device or not t.is_contiguous():
        raise InputError(f"{label}: must be a contiguous tensor on {device}")
    return t
