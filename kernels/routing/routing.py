"""Router + grouping into the packed (batch, memory) segment layout, fully on the device.

Two kernels, grids from shapes only (no host synchronisation, CUDA-graph capturable):

1. ``_route_count_kernel`` (grid ``[cdiv(T, BLOCK_T), B]``): fp32 softmax over the E logits,
   top-k by repeated arg-max (ties pick the lower memory index), renormalise, append the shared
   slot (memory E, weight 1); writes ``weights``/``idx`` and each block's token count per memory.
2. ``_group_scatter_kernel`` (same grid): a stable counting sort. Every program scans the block
   counts of its batch row (totals per memory -> segment starts, and the counts of the earlier
   blocks -> its own offset per memory), ranks its tokens inside the block with ``tl.cumsum``
   and scatters ``token_index``/``row_mem``/``row_seg``; it also writes ``slot``, and the first
   block of each row writes that row's ``cu_seqlens``. Rows of a segment stay in time order.

Batch row b owns packed rows ``[b*T*J, (b+1)*T*J)`` (every token has exactly J slots), so
segment starts need only a scan inside the row. The scan costs O(blocks per row) per program:
keep ``T / BLOCK_T`` moderate (a few hundred) for very long sequences.

Slot order: the top-k slots by descending probability (as ``torch.topk``), then the shared slot.

Packed sequences (``seq_offsets``, constexpr VARLEN): logits [1, N, E] hold S sequences; the
grid is [cdiv(longest, BLOCK_T), S], each sequence a row whose rows start at J*seq_offsets[i].

Padding (``valid``, optional; constexpr HAS_MASK, so the unmasked kernels are unchanged): a
masked token takes no memory (idx -1, weight 0 in every slot) and its J rows go after every
segment's, in a tail that is a pseudo-memory M in the counts. Batch row b's segments then start
at ``row_base[b]`` (J times the valid tokens of the rows before it), ``cu_seqlens[-1]`` counts
the rows in segments, and tail rows carry memory 0 and segment B*M-1, so kernels that read every
packed row (conv, gate) stay in bounds; nothing reads their results.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from momtune.checks import check_int, check_tensor
from momtune.errors import InputError

from .common import INDEX_DTYPES, output_tensor, require_triton_device, resolve_config

DEFAULT_CONFIG: dict[str, int] = {"BLOCK_T": 128, "num_warps": 4}
GATHER_DEFAULT_CONFIG: dict[str, int] = {"BLOCK_R": 16, "BLOCK_D": 256, "num_warps": 4}
SCAN_CHUNK = 128  # blocks per step of the count scan in the scatter kernel


class RoutingResult(NamedTuple):
    """The packed layout (see docs/CONVENTIONS.md); M = E + shared, J = topk + shared, Np = B*T*J.

    weights     [B, T, J] float32   renormalised top-k probabilities, shared slot last (1.0)
    idx         [B, T, J] int32     memory of each slot (shared = E)
    cu_seqlens  [B*M + 1] int32     segment bounds, segment s = b*M + m (empty ones kept)
    slot        [B, T, J] int32     packed row of each (token, slot)
    token_index [Np] int32          flat token b*T + t of each packed row
    row_mem     [Np] int32          memory of each packed row
    row_seg     [Np] int32          segment of each packed row
    """

    weights: torch.Tensor
    idx: torch.Tensor
    cu_seqlens: torch.Tensor
    slot: torch.Tensor
    token_index: torch.Tensor
    row_mem: torch.Tensor
    row_seg: torch.Tensor


@triton.jit
def _route_count_kernel(
    logits_ptr, w_ptr, idx_ptr, counts_ptr, valid_ptr, seq_ptr,
    T, NB, stride_lb, stride_lt, stride_le, stride_vb,
    E: tl.constexpr, TOPK: tl.constexpr, SHARED: tl.constexpr, M: tl.constexpr, J: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
    HAS_MASK: tl.constexpr, MC: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    em = e < E
    if VARLEN:  # row b = packed sequence b: tokens seq[b] .. seq[b+1]-1 of logits [1, N, E]
        tb = tl.load(seq_ptr + b)
        tm = t < tl.load(seq_ptr + b + 1) - tb
        lrow = logits_ptr + (tb + t[:, None]) * stride_lt
    else:
        tb = b * T
        tm = t < T
        lrow = logits_ptr + b * stride_lb + t[:, None] * stride_lt
    x = tl.load(lrow + e[None, :] * stride_le, mask=tm[:, None] & em[None, :], other=0.0).to(tl.float32)
    x = tl.where(em[None, :], x, float("-inf"))
    ex = tl.exp(x - tl.max(x, 1)[:, None])
    p = ex / tl.sum(ex, 1)[:, None]
    score = tl.where(p == p, p, float("-inf"))  # NaN never wins, indices stay valid
    avail = em[None, :] & (t[:, None] >= 0)
    jr = tl.arange(0, BLOCK_J)
    mr = tl.arange(0, BLOCK_M)
    wt = tl.zeros([BLOCK_T, BLOCK_J], dtype=tl.float32)
    it = tl.zeros([BLOCK_T, BLOCK_J], dtype=tl.int32)
    sel = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.int32)
    wsum = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        s = tl.where(avail, score, float("-inf"))
        best = tl.max(s, 1)
        k = tl.min(tl.where(avail & (s == best[:, None]), e[None, :], BLOCK_E), 1)  # lowest index on ties
        avail = avail & (e[None, :] != k[:, None])
        wsum += best
        wt = tl.where(jr[None, :] == j, best[:, None], wt)
        it = tl.where(jr[None, :] == j, k[:, None], it)
        sel += (mr[None, :] == k[:, None]).to(tl.int32)
    wt = wt / wsum[:, None]
    if SHARED:
        wt = tl.where(jr[None, :] == TOPK, 1.0, wt)
        it = tl.where(jr[None, :] == TOPK, E, it)
        sel += (mr[None, :] == E).to(tl.int32)
    if HAS_MASK:  # count columns MC = M + 1: the memories, then the tail of masked tokens
        ok = tl.load(valid_ptr + b * stride_vb + t, mask=tm, other=0) != 0
        wt = tl.where(ok[:, None], wt, 0.0)
        it = tl.where(ok[:, None], it, -1)
        sel = tl.where(ok[:, None], sel, tl.where(mr[None, :] == M, J, 0))
    off = (tb + t)[:, None] * J + jr[None, :]
    om = tm[:, None] & (jr[None, :] < J)
    tl.store(w_ptr + off, wt, mask=om)
    tl.store(idx_ptr + off, it, mask=om)
    cnt = tl.sum(tl.where(tm[:, None], sel, 0), 0)
    tl.store(counts_ptr + (b * NB + pid_t) * MC + mr, cnt, mask=mr < MC)


@triton.jit
def _group_scatter_kernel(
    idx_ptr, counts_ptr, cu_ptr, slot_ptr, tok_ptr, mem_ptr, seg_ptr, rowbase_ptr, seq_ptr,
    B, T, NB,
    M: tl.constexpr, J: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NB: tl.constexpr, HAS_MASK: tl.constexpr,
    MC: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    mr = tl.arange(0, BLOCK_M)
    mm = mr < M
    tot = tl.zeros([BLOCK_M], dtype=tl.int32)
    before = tl.zeros([BLOCK_M], dtype=tl.int32)
    for c0 in range(0, NB, BLOCK_NB):
        blk = c0 + tl.arange(0, BLOCK_NB)
        c = tl.load(counts_ptr + (b * NB + blk[:, None]) * MC + mr[None, :],
                    mask=(blk < NB)[:, None] & (mr < MC)[None, :], other=0)
        tot += tl.sum(c, 0)
        before += tl.sum(tl.where(blk[:, None] < pid_t, c, 0), 0)
    if HAS_MASK:  # rows before this batch row's: the valid ones of earlier rows; the tail after all
        rb = tl.load(rowbase_ptr + b + mr * 0)
        n_seg = tl.load(rowbase_ptr + B + mr * 0)
        base = rb + tl.cumsum(tot, 0) - tot
        base = tl.where(mr == M, n_seg + b * T * J - rb, base)
    elif VARLEN:  # sequence b owns rows seq[b]*J .. seq[b+1]*J
        n_seg = tl.load(seq_ptr + B + mr * 0) * J
        base = tl.load(seq_ptr + b + mr * 0) * J + tl.cumsum(tot, 0) - tot
    else:
        n_seg = tl.zeros([BLOCK_M], dtype=tl.int32) + B * T * J
        base = b * T * J + tl.cumsum(tot, 0) - tot  # segment starts of this batch row
    first = (mr * 0 + pid_t) == 0  # (as a tensor: scalar masks are not portable)
    tl.store(cu_ptr + b * M + mr, base, mask=mm & first)
    tl.store(cu_ptr + B * M + mr, n_seg, mask=(mr + b == 0) & first)
    start = base + before

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    if VARLEN:
        tb = tl.load(seq_ptr + b)
        tm = t < tl.load(seq_ptr + b + 1) - tb
        tok = tb + t
    else:
        tm = t < T
        tok = b * T + t
    sel = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.int32)
    for j in tl.static_range(J):
        k = tl.load(idx_ptr + tok * J + j, mask=tm, other=BLOCK_M)
        if HAS_MASK:
            k = tl.where(k < 0, M, k)  # a masked token's slots go to the tail column
        sel += (mr[None, :] == k[:, None]).to(tl.int32)
    pos = start[None, :] + tl.cumsum(sel, 0) - sel  # stable rank inside the block
    for j in tl.static_range(J):
        k = tl.load(idx_ptr + tok * J + j, mask=tm, other=BLOCK_M)
        if HAS_MASK:
            k = tl.where(k < 0, M, k)
        row = tl.sum(tl.where(mr[None, :] == k[:, None], pos, 0), 1)
        if HAS_MASK:  # a masked token's J slots share the tail column: J consecutive rows
            row += tl.where(k == M, j, 0)
        tl.store(slot_ptr + tok * J + j, row, mask=tm)
        tl.store(tok_ptr + row, tok, mask=tm)
        if HAS_MASK:  # tail rows: memory 0 and the last segment (in bounds for every reader)
            tl.store(mem_ptr + row, tl.where(k == M, 0, k), mask=tm)
            tl.store(seg_ptr + row, tl.where(k == M, B * M - 1, b * M + k), mask=tm)
        else:
            tl.store(mem_ptr + row, k, mask=tm)
            tl.store(seg_ptr + row, b * M + k, mask=tm)


@triton.jit
def _gather_rows_kernel(x_ptr, index_ptr, y_ptr, N, D, stride_x,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rm = r < N
    mask = rm[:, None] & (d < D)[None, :]
    src = tl.load(index_ptr + r, mask=rm, other=0).to(tl.int64)
    v = tl.load(x_ptr + src[:, None] * stride_x + d[None, :], mask=mask)
    tl.store(y_ptr + r.to(tl.int64)[:, None] * D + d[None, :], v, mask=mask)


def route_and_group(
    logits: torch.Tensor,
    topk: int,
    *,
    shared: bool,
    config: Mapping[str, Any] | None = None,
    out: RoutingResult | Mapping[str, torch.Tensor] | None = None,
    valid: torch.Tensor | None = None,
    seq_offsets: torch.Tensor | None = None,
    max_len: int | None = None,
) -> RoutingResult:
    """logits [B, T, E] (any float dtype) -> :class:`RoutingResult` of the packed layout.

    ``out`` (optional) gives preallocated outputs by field name. Top-k ties pick the lower
    memory index; NaN logits never win (the layout stays a valid permutation). ``valid`` [B, T]
    (bool, optional): padding; a False token joins no segment (see the module docstring).
    ``seq_offsets`` [S+1] (optional, int): logits [1, N, E] hold S packed sequences (starts at 0,
    non-decreasing, ends at N); each is a row of its own (segments s = i*M + m), nothing padded;
    ``max_len``: the longest sequence (read from ``seq_offsets`` on the host if not given).
    """
    B, T, E, M, J, cfg = _check_routing(logits, topk, shared, config)
    Np, dev = B * T * J, logits.device
    seq = None
    if seq_offsets is not None:
        seq, max_len = _check_seq_offsets(seq_offsets, max_len, logits, valid)
        B = seq.numel() - 1  # rows = sequences; the outputs keep logits' [1, N] token shape
    if Np >= 2**31:
        raise InputError(f"logits: B*T*J = {Np} packed rows do not fit int32 indices")
    i32 = torch.int32
    tok_shape = tuple(logits.shape[:2]) + (J,)
    res = RoutingResult(
        weights=output_tensor(out, "weights", tok_shape, torch.float32, dev),
        idx=output_tensor(out, "idx", tok_shape, i32, dev),
        cu_seqlens=output_tensor(out, "cu_seqlens", (B * M + 1,), i32, dev),
        slot=output_tensor(out, "slot", tok_shape, i32, dev),
        token_index=output_tensor(out, "token_index", (Np,), i32, dev),
        row_mem=output_tensor(out, "row_mem", (Np,), i32, dev),
        row_seg=output_tensor(out, "row_seg", (Np,), i32, dev),
    )
    if B == 0 or T == 0 or Np == 0:
        res.cu_seqlens.zero_()
        return res
    v8 = valid_flags(valid, B, T, dev)
    if seq is not None:
        T = max_len
    counts, seq_arg, grid, meta = _launch_count(logits, res.weights, res.idx, topk, shared, cfg, v8, seq,
                                                B, T, E, M, J)
    NB = grid[0]
    if v8 is None:
        row_base = counts  # (unused)
    else:  # J x the valid tokens of the rows before each batch row, then of all rows
        row_base = torch.zeros(B + 1, dtype=i32, device=dev)
        torch.cumsum(v8.sum(1, dtype=i32) * J, 0, dtype=i32, out=row_base[1:])
    _group_scatter_kernel[grid](
        res.idx, counts, res.cu_seqlens, res.slot, res.token_index, res.row_mem, res.row_seg, row_base, seq_arg,
        B, T, NB, M=M, J=J, BLOCK_NB=min(triton.next_power_of_2(NB), SCAN_CHUNK), **meta,
    )
    return res


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
    int32) exactly as :func:`route_and_group` gives them, in one launch (its first kernel): each
    decode token reads its memories' states directly, so the packed layout is not built.
    ``out`` (optional) holds preallocated ``weights``/``idx``; ``valid`` [B, T] bool (optional):
    a False (padding) token gets idx -1 and weight 0 in every slot."""
    B, T, E, M, J, cfg = _check_routing(logits, topk, shared, config)
    dev = logits.device
    weights = output_tensor(out, "weights", (B, T, J), torch.float32, dev)
    idx = output_tensor(out, "idx", (B, T, J), torch.int32, dev)
    if B and T:
        _launch_count(logits, weights, idx, topk, shared, cfg, valid_flags(valid, B, T, dev), None, B, T, E, M, J)
    return weights, idx


def _check_routing(logits: torch.Tensor, topk: int, shared: object,
                   config: Mapping[str, Any] | None) -> tuple[int, int, int, int, int, dict[str, int]]:
    """The checks both entry points share; (B, T, E, M, J, config)."""
    check_tensor("logits", logits, ndim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if not isinstance(shared, bool):
        raise InputError(f"shared: expected a bool, got {shared!r}")
    B, T, E = logits.shape
    check_int("topk", topk, lo=1, hi=E)
    cfg = resolve_config(config, DEFAULT_CONFIG, "routing")
    require_triton_device(logits)
    return B, T, E, E + int(shared), topk + int(shared), cfg


def _launch_count(logits, weights, idx, topk, shared, cfg, v8, seq, B, T, E, M, J):
    """The top-k kernel over [cdiv(T, BLOCK_T), B] (T = the longest sequence with ``seq``); returns
    the block counts, the sequence-offsets argument, the grid and the constexprs the scatter shares."""
    MC = M + int(v8 is not None)
    NB = triton.cdiv(T, cfg["BLOCK_T"])
    counts = torch.empty((B, NB, MC), dtype=torch.int32, device=logits.device)
    meta = dict(BLOCK_T=cfg["BLOCK_T"], BLOCK_M=triton.next_power_of_2(MC), num_warps=cfg["num_warps"],
                HAS_MASK=v8 is not None, MC=MC, VARLEN=seq is not None)
    seq_arg = counts if seq is None else seq
    _route_count_kernel[(NB, B)](
        logits, weights, idx, counts, logits if v8 is None else v8, seq_arg, T, NB, *logits.stride(),
        0 if v8 is None else v8.stride(0),
        E=E, TOPK=topk, SHARED=shared, M=M, J=J,
        BLOCK_E=triton.next_power_of_2(E), BLOCK_J=triton.next_power_of_2(J), **meta,
    )
    return counts, seq_arg, (NB, B), meta


def _check_seq_offsets(seq_offsets: torch.Tensor, max_len: int | None, logits: torch.Tensor,
                       valid: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """seq_offsets as contiguous int32 on logits' device, and the longest sequence."""
    check_tensor("seq_offsets", seq_offsets, ndim=1, dtypes=INDEX_DTYPES)
    if logits.shape[0] != 1:
        raise InputError(f"logits: with seq_offsets the sequences are packed along dim 1; expected [1, N, E], "
                         f"got {list(logits.shape)}")
    if valid is not None:
        raise InputError("valid: packed sequences (seq_offsets) have no padding; give one or the other")
    if seq_offsets.numel() < 2 or seq_offsets.device != logits.device:
        raise InputError(f"seq_offsets: expected [S+1] (S >= 1) on {logits.device}, got {list(seq_offsets.shape)} "
                         f"on {seq_offsets.device}")
    seq = seq_offsets.to(torch.int32).contiguous()
    if max_len is None:
        max_len = int((seq[1:] - seq[:-1]).max())
    check_int("max_len", max_len, lo=0)
    return seq, max(1, max_len)


def valid_flags(valid: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor | None:
    """The padding mask [B, T] as a uint8 view the kernels read (no copy for a bool tensor with
    contiguous rows); None stays None."""
    if valid is None:
        return None
    check_tensor("valid", valid, shape=(B, T), dtypes=(torch.bool,))
    if valid.device != device:
        raise InputError(f"valid: on {valid.device}, logits on {device}")
    if T and valid.stride(-1) != 1:
        valid = valid.contiguous()
    return valid.view(torch.uint8)


def gather_rows(
    x: torch.Tensor,
    token_index: torch.Tensor,
    *,
    config: Mapping[str, Any] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [B*T, D], token_index [Np] -> x[token_index] [Np, D] (a tiled copy, x's dtype)."""
    check_tensor("x", x, ndim=2)
    check_tensor("token_index", token_index, ndim=1, dtypes=INDEX_DTYPES)
    if x.stride(-1) != 1:
        raise InputError(f"x: the last dimension must be contiguous, got strides {tuple(x.stride())}")
    cfg = resolve_config(config, GATHER_DEFAULT_CONFIG, "gather_rows")
    require_triton_device(x, token_index)
    N, D = token_index.shape[0], x.shape[1]
    out = output_tensor(out, "out", (N, D), x.dtype, x.device)
    if N and D:
        grid = (triton.cdiv(N, cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))
        _gather_rows_kernel[grid](x, token_index, out, N, D, x.stride(0),
                                  BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return out
