"""Top-k routing alone (weights and idx, no packed layout): what a decode step needs.

A file of its own so that the routing template's sources (and with them the provenance hash of
tuned routing configs) stay as they are: it launches the same first kernel as
:func:`momtune.kernels.routing.route_and_group`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton

from momtune.checks import check_int, check_tensor
from momtune.errors import InputError

from .common import output_tensor, require_triton_device, resolve_config
from .routing import DEFAULT_CONFIG, _route_count_kernel, valid_flags


def route_topk(
    logits: torch.Tensor,
    topk: int,
    *,
    shared: bool,
    config: Mapping[str, Any] | None = None,
    out: Mapping[str, torch.Tensor] | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, E] (any float dtype, any strides) -> (weights [B, T, J] float32, idx [B, T, J]
    int32) exactly as :func:`route_and_group` gives them, in one launch: each decode token reads
    its memories' states directly, so the packed layout is not built. ``out`` (optional) holds
    preallocated ``weights``/``idx``; ``valid`` [B, T] bool (optional): a False (padding) token
    gets idx -1 and weight 0 in every slot."""
    check_tensor("logits", logits, ndim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if not isinstance(shared, bool):
        raise InputError(f"shared: expected a bool, got {shared!r}")
    B, T, E = logits.shape
    check_int("topk", topk, lo=1, hi=E)
    cfg = resolve_config(config, DEFAULT_CONFIG, "routing")
    require_triton_device(logits)
    M, J, dev = E + int(shared), topk + int(shared), logits.device
    weights = output_tensor(out, "weights", (B, T, J), torch.float32, dev)
    idx = output_tensor(out, "idx", (B, T, J), torch.int32, dev)
    if B == 0 or T == 0:
        return weights, idx
    v8 = valid_flags(valid, B, T, dev)
    MC = M + int(v8 is not None)
    NB = triton.cdiv(T, cfg["BLOCK_T"])
    counts = torch.empty((B, NB, MC), dtype=torch.int32, device=dev)  # written by the kernel, unused here
    _route_count_kernel[(NB, B)](
        logits, weights, idx, counts, logits if v8 is None else v8, counts, T, NB, *logits.stride(),
        0 if v8 is None else v8.stride(0),
        E=E, TOPK=topk, SHARED=shared, M=M, J=J, BLOCK_E=triton.next_power_of_2(E),
        BLOCK_J=triton.next_power_of_2(J), BLOCK_T=cfg["BLOCK_T"], BLOCK_M=triton.next_power_of_2(MC),
        num_warps=cfg["num_warps"], HAS_MASK=v8 is not None, MC=MC, VARLEN=False,
    )
    return weights, idx
