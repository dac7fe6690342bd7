"""Backward of the fused gather + causal depthwise short conv + SiLU (issue 14): the gradients
of the source rows and of the conv weight.

Forward (kernels/conv/conv.py), per packed row r of segment s (rows start(s) .. end(s)-1) and
channel c, with x_j the gathered source row of packed row j (zero before the segment start: the
training forward has no initial window):

    a[r] = sum_i w[c, i] * x_{r-(W-1-i)},   y[r] = silu(a[r])

Given dy [Np, C]:

    da[r]        = dy[r] * silu'(a[r])                      silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)
    dx_j         = sum_i w[c, i] * da[j + (W-1-i)]         (rows of j's own segment only)
    dw[c, i]     = sum_r da[r] * x_{r-(W-1-i)}

Two passes (no atomics; the weight's gradient is deterministic):
1. ``_conv_bwd_da_kernel``: recomputes a from the gathered rows (the forward saves nothing but
   its inputs), writes da (fp32, [Np, C]) and each program's partial dw ([programs, W, C] fp32,
   one row per tap), summed over programs at the end.
2. ``_conv_bwd_dx_kernel``: dx of every packed row from the da of the W rows it feeds, written
   straight to the source's gradient: ``dsrc[token_index[r], row_mem[r]]`` for a per-memory source
   [B*T, M, C] (a token's memories are distinct: each element is written once; the memories a
   token did not pick stay zero), or, for a source shared by the memories ([B*T, C]: every token's
   J rows read one row), the rows' gradients [Np, C] summed per token afterwards (fp32).

Rows past ``cu_seqlens[-1]`` (the padding tail of a masked routing) belong to no segment: they
get and give no gradient. Memory-bound: pass 1 reads the gathered rows (the W taps of
neighbouring rows hit the cache) and dy and writes da; pass 2 reads da W times (cache) and
writes dx.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from momtune.checks import check_tensor
from momtune.errors import InputError
from momtune.kernels.routing.common import output_tensor, require_triton_device, resolve_config

from .conv import _src_strides, checked_layout

DEFAULT_CONFIG: dict[str, int] = {"BLOCK_N": 32, "BLOCK_C": 128, "num_warps": 4}


@triton.jit
def _tap(src_ptr, tok_ptr, rr, rm, start, mem, c, cm, stride_st, stride_sm, EVEN_C: tl.constexpr):
    """The gathered source rows of packed rows ``rr`` (one tap of rows r), fp32; zero before
    their segment's start (no initial window) and for rows outside a segment."""
    inseg = rm & (rr >= start)
    tok = tl.load(tok_ptr + rr, mask=inseg, other=0).to(tl.int64)
    if EVEN_C:
        m2 = inseg[:, None]
    else:
        m2 = inseg[:, None] & cm[None, :]
    return tl.load(src_ptr + tok[:, None] * stride_st + mem[:, None] * stride_sm + c[None, :],
                   mask=m2, other=0.0).to(tl.float32)


@triton.jit
def _conv_bwd_da_kernel(
    src_ptr, w_ptr, tok_ptr, mem_ptr, seg_ptr, cu_ptr, dy_ptr, da_ptr, dwp_ptr,
    N, C, S, stride_st, stride_sm, stride_wc, stride_ww, stride_dy,
    W: tl.constexpr, W_PAD: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    rm = r < tl.load(cu_ptr + S)  # rows in segments (the padding tail, if any, follows them)
    seg = tl.load(seg_ptr + r, mask=rm, other=0)
    start = tl.load(cu_ptr + seg, mask=rm, other=0)
    mem = tl.load(mem_ptr + r, mask=rm, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(W):  # a, as the forward computes it
        x = _tap(src_ptr, tok_ptr, r - (W - 1 - i), rm, start, mem, c, cm, stride_st, stride_sm, EVEN_C)
        wt = tl.load(w_ptr + c * stride_wc + i * stride_ww, mask=cm, other=0.0).to(tl.float32)
        acc += x * wt[None, :]
    if EVEN_C:
        mo = rm[:, None]
    else:
        mo = rm[:, None] & cm[None, :]
    r64 = r.to(tl.int64)
    dy = tl.load(dy_ptr + r64[:, None] * stride_dy + c[None, :], mask=mo, other=0.0).to(tl.float32)
    s = tl.sigmoid(acc)
    da = dy * s * (1.0 + acc * (1.0 - s))  # rows outside a segment load dy 0: da 0
    tl.store(da_ptr + r64[:, None] * C + c[None, :], da, mask=mo)
    taps = tl.arange(0, W_PAD)
    dw = tl.zeros([W_PAD, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(W):  # the taps again (cache hits): dw[i] += sum over rows of da * x_i
        x = _tap(src_ptr, tok_ptr, r - (W - 1 - i), rm, start, mem, c, cm, stride_st, stride_sm, EVEN_C)
        dw += tl.where(taps[:, None] == i, tl.sum(da * x, 0)[None, :], 0.0)
    tl.store(dwp_ptr + (pid_n.to(tl.int64) * W + taps[:, None]) * C + c[None, :], dw,
             mask=(taps < W)[:, None] & cm[None, :])


@triton.jit
def _conv_bwd_dx_kernel(
    da_ptr, w_ptr, tok_ptr, mem_ptr, seg_ptr, cu_ptr, dx_ptr,
    N, C, S, stride_dt, stride_dm, stride_wc, stride_ww,
    W: tl.constexpr, SCATTER: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    rm = r < tl.load(cu_ptr + S)
    seg = tl.load(seg_ptr + r, mask=rm, other=0)
    end = tl.load(cu_ptr + seg + 1, mask=rm, other=0)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(W):  # row r feeds row r + (W-1-i) through tap i
        rr = r + (W - 1 - i)
        inseg = rm & (rr < end)
        if EVEN_C:
            m2 = inseg[:, None]
        else:
            m2 = inseg[:, None] & cm[None, :]
        d = tl.load(da_ptr + rr.to(tl.int64)[:, None] * C + c[None, :], mask=m2, other=0.0)
        wt = tl.load(w_ptr + c * stride_wc + i * stride_ww, mask=cm, other=0.0).to(tl.float32)
        acc += d * wt[None, :]
    if EVEN_C:
        mo = rm[:, None]
    else:
        mo = rm[:, None] & cm[None, :]
    if SCATTER:  # straight into the per-memory source's gradient
        tok = tl.load(tok_ptr + r, mask=rm, other=0).to(tl.int64)
        mem = tl.load(mem_ptr + r, mask=rm, other=0).to(tl.int64)
        tl.store(dx_ptr + tok[:, None] * stride_dt + mem[:, None] * stride_dm + c[None, :],
                 acc.to(dx_ptr.dtype.element_ty), mask=mo)
    else:  # per packed row (fp32), summed per token by the caller
        tl.store(dx_ptr + r.to(tl.int64)[:, None] * C + c[None, :], acc, mask=mo)


def segment_conv_backward(
    src: torch.Tensor,
    weight: torch.Tensor,
    token_index: torch.Tensor,
    row_mem: torch.Tensor,
    row_seg: torch.Tensor,
    cu_seqlens: torch.Tensor,
    dy: torch.Tensor,
    *,
    config: Mapping[str, Any] | None = None,
    out: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`~momtune.kernels.conv.conv.segment_conv` without an initial window.

    src [B*T, C] or [B*T, M, C] (any strides with a contiguous last dim), weight [C, W] or
    [C, 1, W], the layout's token_index / row_mem / row_seg [Np] and cu_seqlens [S+1], and dy
    [Np, C] in src's dtype -> (dsrc, the shape of src, contiguous, in src's dtype; dweight [C, W]
    in weight's dtype). ``out`` may hold ``dsrc`` and ``dw`` to write into.
    """
    weight, token_index, row_mem, row_seg, cu_seqlens = checked_layout(src, weight, token_index, row_mem, row_seg,
                                                                        cu_seqlens)
    C, W, Np, S = src.shape[-1], weight.shape[1], token_index.shape[0], cu_seqlens.shape[0] - 1
    check_tensor("dy", dy, shape=(Np, C), dtypes=(src.dtype,))
    if C and dy.stride(-1) != 1:
        raise InputError(f"dy: the last dimension must be contiguous, got strides {tuple(dy.stride())}")
    st, sm = _src_strides("src", src)
    cfg = resolve_config(config, DEFAULT_CONFIG, "conv_bwd")
    require_triton_device(src, weight, token_index, row_mem, row_seg, cu_seqlens, dy)
    dsrc = output_tensor(out, "dsrc", tuple(src.shape), src.dtype, src.device)
    dw = output_tensor(out, "dw", (C, W), weight.dtype, src.device)
    BN, BC = cfg["BLOCK_N"], cfg["BLOCK_C"]
    programs = triton.cdiv(Np, BN)
    if not Np or not C:
        dsrc.zero_()
        dw.zero_()
        return dsrc, dw
    da = torch.empty(Np, C, dtype=torch.float32, device=src.device)
    partial = torch.empty(programs, W, C, dtype=torch.float32, device=src.device)
    grid = (programs, triton.cdiv(C, BC))
    even = C % BC == 0
    _conv_bwd_da_kernel[grid](
        src, weight, token_index, row_mem, row_seg, cu_seqlens, dy, da, partial,
        Np, C, S, st, sm, weight.stride(0), weight.stride(1), dy.stride(0),
        W=W, W_PAD=triton.next_power_of_2(W), EVEN_C=even, BLOCK_N=BN, BLOCK_C=BC, num_warps=cfg["num_warps"],
    )
    scatter = src.dim() == 3
    if scatter:
        dsrc.zero_()  # the memories a token did not pick get no gradient
        target, sdt, sdm = dsrc, dsrc.stride(0), dsrc.stride(1)
    else:
        # zeros: rows past cu_seqlens[-1] are not written and then add nothing
        target, sdt, sdm = torch.zeros(Np, C, dtype=torch.float32, device=src.device), 0, 0
    _conv_bwd_dx_kernel[grid](
        da, weight, token_index, row_mem, row_seg, cu_seqlens, target,
        Np, C, S, sdt, sdm, weight.stride(0), weight.stride(1),
        W=W, SCATTER=scatter, EVEN_C=even, BLOCK_N=BN, BLOCK_C=BC, num_warps=cfg["num_warps"],
    )
    if not scatter:  # every token's J rows read one source row: their gradients add
        acc = torch.zeros(src.shape[0], C, dtype=torch.float32, device=src.device)
        dsrc.copy_(acc.index_add_(0, token_index.long(), target))
    dw.copy_(partial.sum(0).t())
    return dsrc, dw
