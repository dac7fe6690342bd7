"""Fused gather + causal depthwise short conv (+SiLU) over the packed segments, and the fused
gather of the decay / beta gates.

``segment_conv``: one program per (BLOCK_N packed rows, BLOCK_C channels). For each tap it
gathers the source rows ``src[token_index[r-d], row_mem[r]]`` (d = 0..W-1) of the same segment;
rows before the segment start come from that segment's initial window (zeros without one), so
nothing leaks across segments. Accumulates in fp32, applies SiLU, stores in src's dtype.
Final windows (the decode cache: last W-1 inputs of each segment) are written by a second,
per-segment kernel that runs after the first, so ``final_window`` may alias ``initial_window``
(in-place cache update): no program writes rows another program still reads.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from momtune.checks import check_tensor
from momtune.errors import InputError
from momtune.kernels.routing.common import FLOAT_DTYPES, INDEX_DTYPES, output_tensor, require_triton_device, resolve_config

DEFAULT_CONFIG: dict[str, int] = {"BLOCK_N": 32, "BLOCK_C": 128, "num_warps": 4}
MAX_WIDTH = 16


@triton.jit
def _segment_conv_kernel(
    src_ptr, w_ptr, tok_ptr, mem_ptr, seg_ptr, cu_ptr, init_ptr, y_ptr,
    N, C, stride_st, stride_sm, stride_wc, stride_ww, stride_is, stride_ik,
    W: tl.constexpr, HAS_INIT: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = r < N
    cm = c < C
    seg = tl.load(seg_ptr + r, mask=rm, other=0)
    start = tl.load(cu_ptr + seg, mask=rm, other=0)
    mem = tl.load(mem_ptr + r, mask=rm, other=0).to(tl.int64)  # rows of a segment share the memory
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(W):
        rr = r - (W - 1 - i)  # the input row of tap i
        inseg = rm & (rr >= start)
        tok = tl.load(tok_ptr + rr, mask=inseg, other=0).to(tl.int64)
        if EVEN_C:
            m2 = inseg[:, None]
        else:
            m2 = inseg[:, None] & cm[None, :]
        x = tl.load(src_ptr + tok[:, None] * stride_st + mem[:, None] * stride_sm + c[None, :],
                    mask=m2, other=0.0).to(tl.float32)
        if HAS_INIT:
            inwin = rm & (rr < start)
            wrow = (seg.to(tl.int64) * stride_is + (rr - start + (W - 1)) * stride_ik)
            xw = tl.load(init_ptr + wrow[:, None] + c[None, :], mask=inwin[:, None] & cm[None, :], other=0.0)
            x += xw.to(tl.float32)
        wt = tl.load(w_ptr + c * stride_wc + i * stride_ww, mask=cm, other=0.0).to(tl.float32)
        acc += x * wt[None, :]
    y = acc * tl.sigmoid(acc)
    if EVEN_C:
        m2 = rm[:, None]
    else:
        m2 = rm[:, None] & cm[None, :]
    tl.store(y_ptr + r.to(tl.int64)[:, None] * C + c[None, :], y.to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _final_window_kernel(
    src_ptr, tok_ptr, mem_ptr, cu_ptr, init_ptr, fw_ptr,
    C, stride_st, stride_sm, stride_is, stride_ik, stride_fs, stride_fk,
    W: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    k = tl.arange(0, BLOCK_W)
    km = k < W - 1
    start = tl.load(cu_ptr + s + k * 0)  # (as vectors: scalar loads are not portable)
    end = tl.load(cu_ptr + s + 1 + k * 0)
    pos = end - start - (W - 1) + k  # position in the segment of window row k
    fromsrc = km & (pos >= 0)
    rr = start + pos
    tok = tl.load(tok_ptr + rr, mask=fromsrc, other=0).to(tl.int64)
    mem = tl.load(mem_ptr + rr, mask=fromsrc, other=0).to(tl.int64)
    x = tl.load(src_ptr + tok[:, None] * stride_st + mem[:, None] * stride_sm + c[None, :],
                mask=fromsrc[:, None] & cm[None, :], other=0.0).to(fw_ptr.dtype.element_ty)
    if HAS_INIT:
        fromwin = km & (pos < 0)
        wrow = s.to(tl.int64) * stride_is + (pos + (W - 1)) * stride_ik
        xw = tl.load(init_ptr + wrow[:, None] + c[None, :], mask=fromwin[:, None] & cm[None, :], other=0.0)
        x = tl.where(fromwin[:, None], xw.to(fw_ptr.dtype.element_ty), x)
    tl.debug_barrier()  # every read of this segment's initial window before any write (in-place)
    tl.store(fw_ptr + s.to(tl.int64) * stride_fs + k[:, None] * stride_fk + c[None, :], x,
             mask=km[:, None] & cm[None, :])


@triton.jit
def _gate_prep_kernel(
    a_ptr, b_ptr, tok_ptr, mem_ptr, alog_ptr, dtb_ptr, g_ptr, beta_ptr,
    N, H, stride_at, stride_am, stride_bt, stride_bm,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.arange(0, BLOCK_H)
    rm = r < N
    hm = h < H
    mask = rm[:, None] & hm[None, :]
    tok = tl.load(tok_ptr + r, mask=rm, other=0).to(tl.int64)
    mem = tl.load(mem_ptr + r, mask=rm, other=0).to(tl.int64)
    a = tl.load(a_ptr + tok[:, None] * stride_at + mem[:, None] * stride_am + h[None, :], mask=mask, other=0.0)
    bb = tl.load(b_ptr + tok[:, None] * stride_bt + mem[:, None] * stride_bm + h[None, :], mask=mask, other=0.0)
    A = tl.exp(tl.load(alog_ptr + h, mask=hm, other=0.0).to(tl.float32))
    x = a.to(tl.float32) + tl.load(dtb_ptr + h, mask=hm, other=0.0).to(tl.float32)[None, :]
    u = tl.exp(-tl.abs(x))  # softplus(x) = max(x, 0) + log1p(exp(-|x|)), log1p by series for tiny u
    sp = tl.maximum(x, 0.0) + tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u))
    out = r.to(tl.int64)[:, None] * H + h[None, :]
    tl.store(g_ptr + out, -A[None, :] * sp, mask=mask)
    tl.store(beta_ptr + out, tl.sigmoid(bb.to(tl.float32)).to(beta_ptr.dtype.element_ty), mask=mask)


def _check_index(name: str, t: torch.Tensor, n: int | None = None) -> torch.Tensor:
    check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES, shape=None if n is None else (n,))
    return t.contiguous()


def _window(name: str, w: torch.Tensor, S: int, W: int, C: int) -> torch.Tensor:
    check_tensor(name, w, shape=(S, W - 1, C), dtypes=FLOAT_DTYPES)
    if w.stride(-1) != 1:
        raise InputError(f"{name}: the channel dimension must be contiguous, got strides {tuple(w.stride())}")
    return w


def _src_strides(name: str, src: torch.Tensor) -> tuple[int, int]:
    if src.stride(-1) != 1:
        raise InputError(f"{name}: the last dimension must be contiguous, got strides {tuple(src.stride())}")
    return src.stride(0), (src.stride(1) if src.dim() == 3 else 0)


def checked_layout(src: torch.Tensor, weight: torch.Tensor, token_index: torch.Tensor, row_mem: torch.Tensor,
                   row_seg: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The checks :func:`segment_conv` and its backward share: src [B*T, C] or [B*T, M, C], weight
    [C, W] or [C, 1, W] (1 <= W <= MAX_WIDTH), index maps [Np], cu_seqlens [S+1] with S >= 1 ->
    (weight [C, W], token_index, row_mem, row_seg, cu_seqlens), the maps contiguous."""
    check_tensor("src", src, dtypes=FLOAT_DTYPES)
    if src.dim() not in (2, 3):
        raise InputError(f"src: expected [B*T, C] or [B*T, M, C], got shape {list(src.shape)}")
    C = src.shape[-1]
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES)
    if weight.dim() == 3 and weight.shape[1] == 1:  # nn.Conv1d's [C, 1, W]
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != C or not 1 <= weight.shape[1] <= MAX_WIDTH:
        raise InputError(f"weight: expected shape [{C}, W] or [{C}, 1, W] with 1 <= W <= {MAX_WIDTH}, "
                         f"got {list(weight.shape)}")
    token_index = _check_index("token_index", token_index)
    Np = token_index.shape[0]
    row_mem = _check_index("row_mem", row_mem, Np)
    row_seg = _check_index("row_seg", row_seg, Np)
    cu_seqlens = _check_index("cu_seqlens", cu_seqlens)
    if cu_seqlens.shape[0] < 2:
        raise InputError(f"cu_seqlens: needs at least 2 entries (one segment), got {cu_seqlens.shape[0]}")
    return weight, token_index, row_mem, row_seg, cu_seqlens


def segment_conv(
    src: torch.Tensor,
    weight: torch.Tensor,
    token_index: torch.Tensor,
    row_mem: torch.Tensor,
    row_seg: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    initial_window: torch.Tensor | None = None,
    final_window: torch.Tensor | None = None,
    config: Mapping[str, Any] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed rows y [Np, C] = silu(causal depthwise conv) of each segment's gathered inputs.

    src [B*T, C] (shared by all memories) or [B*T, M, C] (row r reads src[token_index[r],
    row_mem[r]]); weight [C, W] or [C, 1, W] (weight[:, W-1] multiplies the current row); token_index,
    row_mem, row_seg [Np]; cu_seqlens [S+1]; initial_window [S, W-1, C] (zeros if None).
    If ``final_window`` [S, W-1, C] is given it receives each segment's last W-1 inputs (it
    may be the same tensor as ``initial_window``). y is in src's dtype.
    """
    weight, token_index, row_mem, row_seg, cu_seqlens = checked_layout(src, weight, token_index, row_mem, row_seg,
                                                                        cu_seqlens)
    C, W, Np, S = src.shape[-1], weight.shape[1], token_index.shape[0], cu_seqlens.shape[0] - 1
    if initial_window is not None:
        _window("initial_window", initial_window, S, W, C)
    if final_window is not None:
        _window("final_window", final_window, S, W, C)
    st, sm = _src_strides("src", src)
    cfg = resolve_config(config, DEFAULT_CONFIG, "conv")
    extra = [t for t in (initial_window, final_window) if t is not None]
    require_triton_device(src, weight, token_index, row_mem, row_seg, cu_seqlens, *extra)
    y = output_tensor(out, "out", (Np, C), src.dtype, src.device)
    has_init = initial_window is not None
    init = initial_window if has_init else src
    isd = (initial_window.stride(0), initial_window.stride(1)) if has_init else (0, 0)
    BN, BC = cfg["BLOCK_N"], cfg["BLOCK_C"]
    if Np and C:
        _segment_conv_kernel[(triton.cdiv(Np, BN), triton.cdiv(C, BC))](
            src, weight, token_index, row_mem, row_seg, cu_seqlens, init, y,
            Np, C, st, sm, weight.stride(0), weight.stride(1), *isd,
            W=W, HAS_INIT=has_init, EVEN_C=C % BC == 0, BLOCK_N=BN, BLOCK_C=BC, num_warps=cfg["num_warps"],
        )
    if final_window is not None and W > 1 and C:
        _final_window_kernel[(S, triton.cdiv(C, BC))](
            src, token_index, row_mem, cu_seqlens, init, final_window,
            C, st, sm, *isd, final_window.stride(0), final_window.stride(1),
            W=W, HAS_INIT=has_init, BLOCK_W=triton.next_power_of_2(W - 1), BLOCK_C=BC,
            num_warps=cfg["num_warps"],
        )
    return y


def gate_prep(
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    token_index: torch.Tensor,
    row_mem: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather + gate math per packed row (untuned).

    a_all, b_all [B*T, M, H]; token_index, row_mem [Np]; A_log, dt_bias [H] ->
    (g [Np, H] float32 = -exp(A_log) * softplus(a + dt_bias), beta [Np, H] = sigmoid(b) in
    b_all's dtype). Math in fp32. ``out`` = preallocated (g, beta).
    """
    check_tensor("a_all", a_all, ndim=3, dtypes=FLOAT_DTYPES)
    n_tok, M, H = a_all.shape
    check_tensor("b_all", b_all, shape=(n_tok, M, H), dtypes=FLOAT_DTYPES)
    token_index = _check_index("token_index", token_index)
    Np = token_index.shape[0]
    row_mem = _check_index("row_mem", row_mem, Np)
    check_tensor("A_log", A_log, shape=(H,), dtypes=FLOAT_DTYPES)
    check_tensor("dt_bias", dt_bias, shape=(H,), dtypes=FLOAT_DTYPES)
    sa = _src_strides("a_all", a_all)
    sb = _src_strides("b_all", b_all)
    require_triton_device(a_all, b_all, token_index, row_mem, A_log, dt_bias)
    g = output_tensor(None if out is None else out[0], "out[0]", (Np, H), torch.float32, a_all.device)
    beta = output_tensor(None if out is None else out[1], "out[1]", (Np, H), b_all.dtype, a_all.device)
    if Np and H:
        BN = 64
        _gate_prep_kernel[(triton.cdiv(Np, BN),)](
            a_all, b_all, token_index, row_mem, A_log.contiguous(), dt_bias.contiguous(), g, beta,
            Np, H, *sa, *sb, BLOCK_N=BN, BLOCK_H=triton.next_power_of_2(H), num_warps=4,
        )
    return g, beta
