"""The decode step of one MoM layer: one new token per sequence, fused Triton kernels.

Shapes (HK = H*K, HV = H*V, M = E + shared memories per row, J = topk + shared slots):

    q_t [B, HK]   k_all [B, M, HK]   v_all [B, M, HV]   a_all, b_all [B, M, H]
    idx [B, J] int32/int64 (memory of each slot, distinct per row; < 0 = empty slot)
    weights [B, J]   state [B, M, H, K, V] fp32   conv_q/conv_k [B, M, W-1, HK]
    conv_v [B, M, W-1, HV]   q_conv_w/k_conv_w [HK, W]   v_conv_w [HV, W]   A_log, dt_bias [H]
    gate [B, HV] (optional)  norm_weight [V]   ->   y [B, H, V] in q_t's dtype

Kernels (see :mod:`momtune.kernels.decode.kernels`): conv + norms + gates per routed slot
(scratch), then the state update and read-out per value block, merged over the J slots in a
fixed order, then (unless fused) a small combine/gated-norm kernel. No host synchronisation:
grids depend on shapes only, so a step can be captured in a CUDA graph.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from momtune.checks import check_choice, check_tensor
from momtune.errors import ConfigError, InputError

RULES = ("gated_delta", "gated_linear")
IN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
IDX_DTYPES = (torch.int32, torch.int64)

DEFAULT_CONFIG: dict[str, Any] = {
    "BV": 16, "KSPLIT": 1, "merge": "split", "num_warps": 4, "num_stages": 1, "aux_warps": 4,
}
CHOICES: dict[str, tuple[Any, ...]] = {
    "BV": (4, 8, 16, 32, 64, 128, 256, 512),
    "KSPLIT": (1, 2, 4, 8, 16),
    "merge": ("fused", "split"),
    "num_warps": (1, 2, 4, 8, 16),
    "num_stages": (1, 2, 3, 4),
    "aux_warps": (1, 2, 4, 8, 16),
}


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def resolve_config(config: Mapping[str, Any] | None, K: int, V: int) -> dict[str, Any]:
    """Fill defaults, reject unknown keys and values (ConfigError), clamp blocks to the shape."""
    cfg = dict(DEFAULT_CONFIG)
    if config:
        unknown = sorted(set(config) - set(CHOICES))
        if unknown:
            raise ConfigError(f"decode config: unknown keys {unknown}; known: {', '.join(CHOICES)}")
        cfg.update(config)
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            raise ConfigError(f"decode config: {key}={cfg[key]!r} is not accepted; choose one of {list(choices)}")
    cfg["BV"] = min(int(cfg["BV"]), _pow2(V))
    cfg["BK"] = _pow2(-(-K // int(cfg["KSPLIT"])))
    cfg["NK"] = -(-K // cfg["BK"])
    return cfg


def _check_inputs(q_t, k_all, v_all, a_all, b_all, idx, weights, state, conv_q, conv_k, conv_v,
                  q_conv_w, k_conv_w, v_conv_w, A_log, dt_bias, rule, gate, norm_weight):
    """Shape/dtype/device checks (host metadata only, no synchronisation). Returns the sizes."""
    check_choice("rule", rule, RULES)
    check_tensor("A_log", A_log, ndim=1, dtypes=IN_DTYPES)
    H = A_log.shape[0]
    check_tensor("q_t", q_t, ndim=2, dtypes=IN_DTYPES)
    B, HK = q_t.shape
    check_tensor("v_all", v_all, ndim=3, dtypes=IN_DTYPES)
    M, HV = v_all.shape[1], v_all.shape[2]
    if H < 1 or HK % H or HV % H:
        raise InputError(f"q_t, v_all: widths {HK} and {HV} must be multiples of the head count {H} (from A_log)")
    K, V = HK // H, HV // H
    check_tensor("k_all", k_all, shape=(B, M, HK), dtypes=IN_DTYPES)
    check_tensor("v_all", v_all, shape=(B, M, HV))
    check_tensor("a_all", a_all, shape=(B, M, H), dtypes=IN_DTYPES)
    check_tensor("b_all", b_all, shape=(B, M, H), dtypes=IN_DTYPES)
    check_tensor("idx", idx, ndim=2, dtypes=IDX_DTYPES)
    J = idx.shape[1]
    check_tensor("idx", idx, shape=(B, J))
    if not 1 <= J <= M:
        raise InputError(f"idx: {J} slots per row; accepted 1..{M} (the memories per row, from v_all)")
    check_tensor("weights", weights, shape=(B, J), dtypes=IN_DTYPES)
    check_tensor("state", state, shape=(B, M, H, K, V), dtypes=(torch.float32,))
    check_tensor("q_conv_w", q_conv_w, ndim=2, dtypes=IN_DTYPES)
    W = q_conv_w.shape[1]
    if W < 2:
        raise InputError(f"q_conv_w: conv width {W} not accepted; need at least 2")
    check_tensor("q_conv_w", q_conv_w, shape=(HK, W))
    check_tensor("k_conv_w", k_conv_w, shape=(HK, W), dtypes=IN_DTYPES)
    check_tensor("v_conv_w", v_conv_w, shape=(HV, W), dtypes=IN_DTYPES)
    check_tensor("conv_q", conv_q, shape=(B, M, W - 1, HK), dtypes=IN_DTYPES)
    check_tensor("conv_k", conv_k, shape=(B, M, W - 1, HK), dtypes=IN_DTYPES)
    check_tensor("conv_v", conv_v, shape=(B, M, W - 1, HV), dtypes=IN_DTYPES)
    check_tensor("dt_bias", dt_bias, shape=(H,), dtypes=IN_DTYPES)
    if gate is not None:
        check_tensor("gate", gate, shape=(B, HV), dtypes=IN_DTYPES)
        if norm_weight is None:
            raise InputError("norm_weight: required when gate is given (the gated RMSNorm weight [V])")
        check_tensor("norm_weight", norm_weight, shape=(V,), dtypes=IN_DTYPES)
    elif norm_weight is not None:
        raise InputError("norm_weight: given without gate; the gated RMSNorm needs both (or neither)")
    named = dict(q_t=q_t, k_all=k_all, v_all=v_all, a_all=a_all, b_all=b_all, idx=idx, weights=weights,
                 state=state, conv_q=conv_q, conv_k=conv_k, conv_v=conv_v, q_conv_w=q_conv_w,
                 k_conv_w=k_conv_w, v_conv_w=v_conv_w, A_log=A_log, dt_bias=dt_bias, gate=gate,
                 norm_weight=norm_weight)
    for name, t in named.items():
        if t is not None and t.device != q_t.device:
            raise InputError(f"{name}: on {t.device}, but q_t is on {q_t.device}; all tensors must share a device")
    return B, M, J, H, K, V, W


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is contiguous (any other strides are passed to the
    kernels), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_cache(name: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise InputError(f"{name}: must be contiguous (it is updated in place); got strides {tuple(t.stride())}")
    return t


def decode_step(
    q_t: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, a_all: torch.Tensor,
    b_all: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, state: torch.Tensor,
    conv_q: torch.Tensor, conv_k: torch.Tensor, conv_v: torch.Tensor,
    q_conv_w: torch.Tensor, k_conv_w: torch.Tensor, v_conv_w: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, *,
    rule: str = "gated_delta", scale: float | None = None, gate: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
    config: Mapping[str, Any] | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of a MoM layer; updates ``state`` and the conv windows in place.

    For each row b and slot j (memory m = idx[b, j], distinct within a row; idx < 0 = empty
    slot): q, k, v = silu(short conv over (b, m)'s windows), windows shift by one; g, beta from
    a_all/b_all; q, k L2-normalised, q scaled; S = state[b, m] <- rule update; o = S^T q;
    y[b] = sum_j weights[b, j] o_j, then (with gate) per-head rms_norm(y) * norm_weight *
    silu(gate). Memories not routed in a row are untouched. Returns y [B, H, V] in q_t's dtype.
    """
    return decode_step_into(
        q_t, k_all, v_all, a_all, b_all, idx, weights, state, conv_q, conv_k, conv_v,
        q_conv_w, k_conv_w, v_conv_w, A_log, dt_bias, rule=rule, scale=scale, gate=gate,
        norm_weight=norm_weight, eps=eps, config=config, out=out,
    )


def decode_step_into(
    q_t, k_all, v_all, a_all, b_all, idx, weights, state, conv_q, conv_k, conv_v,
    q_conv_w, k_conv_w, v_conv_w, A_log, dt_bias, *, rule="gated_delta", scale=None, gate=None,
    norm_weight=None, eps=1e-5, config=None, out=None,
    state_out: torch.Tensor | None = None, conv_q_out: torch.Tensor | None = None,
    conv_k_out: torch.Tensor | None = None, conv_v_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`decode_step` that may write the updated cache elsewhere.

    ``state_out``/``conv_*_out`` (default: the inputs themselves, i.e. in place) receive the
    updated entries of the routed memories only; other entries keep what they held. Reading
    one cache and writing another makes repeated launches idempotent (used by the template).
    """
    import triton  # noqa: F401  (imported late: no work at import time)

    from .kernels import _decode_combine_kernel, _decode_conv_kernel, _decode_state_kernel

    B, M, J, H, K, V, W = _check_inputs(
        q_t, k_all, v_all, a_all, b_all, idx, weights, state, conv_q, conv_k, conv_v,
        q_conv_w, k_conv_w, v_conv_w, A_log, dt_bias, rule, gate, norm_weight)
    cfg = resolve_config(config, K, V)
    dsts = []
    for name, src, dst in (("state", state, state_out), ("conv_q", conv_q, conv_q_out),
                           ("conv_k", conv_k, conv_k_out), ("conv_v", conv_v, conv_v_out)):
        _check_cache(name, src)
        if dst is None:
            dst = src
        else:
            check_tensor(f"{name}_out", dst, shape=tuple(src.shape), dtypes=(src.dtype,))
            _check_cache(f"{name}_out", dst)
        dsts.append(dst)
    if out is None:
        out = torch.empty(B, H, V, dtype=q_t.dtype, device=q_t.device)
    else:
        check_tensor("out", out, shape=(B, H, V), dtypes=(q_t.dtype,))
        _check_cache("out", out)
    if B == 0:
        return out
    scale = K ** -0.5 if scale is None else float(scale)
    # the per-token inputs are read through their strides (the model passes strided views of its
    # fused projection: copying them first would add a launch each to every decode step)
    q_t, k_all, v_all, a_all, b_all = (_rows(t) for t in (q_t, k_all, v_all, a_all, b_all))
    idx, weights = idx.contiguous(), weights.contiguous()
    q_conv_w, k_conv_w, v_conv_w, A_log, dt_bias = (
        t.contiguous() for t in (q_conv_w, k_conv_w, v_conv_w, A_log, dt_bias))
    if gate is not None:
        gate, norm_weight = _rows(gate), norm_weight.contiguous()

    dev = q_t.device
    scratch = torch.empty(B * J * H * (2 * K + V + 2), dtype=torch.float32, device=dev)
    n_qk, n_v = B * J * H * K, B * J * H * V
    qn, kn = scratch[:n_qk], scratch[n_qk:2 * n_qk]
    vc, gb = scratch[2 * n_qk:2 * n_qk + n_v], scratch[2 * n_qk + n_v:]

    aux = cfg["aux_warps"]
    _decode_conv_kernel[(B * J, H)](
        q_t, k_all, v_all, a_all, b_all, idx, conv_q, conv_k, conv_v, dsts[1], dsts[2], dsts[3],
        q_conv_w, k_conv_w, v_conv_w, A_log, dt_bias, qn, kn, vc, gb,
        scale, M, J, H, K, V, q_t.stride(0), k_all.stride(0), k_all.stride(1), v_all.stride(0),
        v_all.stride(1), a_all.stride(0), a_all.stride(1), b_all.stride(0), b_all.stride(1), W=W, BK=_pow2(K), BV=_pow2(V), num_warps=aux,
    )

    BV, BK, NK = cfg["BV"], cfg["BK"], cfg["NK"]
    NV = -(-V // BV)
    JP = J if cfg["merge"] == "fused" else 1
    NJ = J // JP
    if B * NJ > 65535:  # grid axis 2 of the state kernel
        raise InputError(f"q_t: batch {B} with {NJ} programs per row exceeds the grid limit 65535; "
                         "use merge='fused' or split the batch")
    has_gate = gate is not None
    fuse_all = JP == J and (NV == 1 or not has_gate)
    target = out if fuse_all else torch.empty(B * NJ, H, V, dtype=torch.float32, device=dev)
    g_arg = gate if has_gate else out
    nw_arg = norm_weight if has_gate else out
    _decode_state_kernel[(NV, H, B * NJ)](
        state, dsts[0], idx, weights, qn, kn, vc, gb, g_arg, nw_arg, target,
        float(eps), M, J, NJ, H, K, V, g_arg.stride(0),
        JP=JP, BK=BK, BV=BV, NK=NK, ONE_PASS=(NK == 1 or rule == "gated_linear"),
        DELTA=(rule == "gated_delta"), NORM=(fuse_all and has_gate),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not fuse_all:
        _decode_combine_kernel[(B, H)](
            target, g_arg, nw_arg, out, float(eps), NJ, H, V, g_arg.stride(0),
            BV=_pow2(V), NORM=has_gate, num_warps=aux,
        )
    return out
