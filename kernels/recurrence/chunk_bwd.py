"""The chunk-local work of the gated-delta recurrence's backward, as Triton kernels (issue 14).

:func:`momtune.reference.recurrence.gated_delta_backward` runs the backward in three passes: the
chunk-local terms, two scans over each segment's chunks (:mod:`.scan`), every chunk's gradients.
With :class:`TritonBackward` as its ``scans`` all of it runs here, straight from the token layout
(q, k [N, H, K] float32, normalised and scaled; v, do [N, H, V], g, beta [N, H] in any float dtype)
to the gradients in the token layout, four launches:

1. :func:`_terms_kernel`, grid (chunk, head): G = cumsum(g), D_ij = exp(G_i - G_j) (i >= j),
   KK = k k^T and QK = q k^T (K blocks), KKD = KK * D strictly below the diagonal,
   T = (I + b KKD)^-1 (:func:`.common._solve_unit_lower`), P = QK * D; writes the scans' inputs
   W = T (b e^G k), U = T (b v), KD = k e^{GL - G}, QE = q e^G, P, GL and DO (do, chunk-major),
   and keeps T and KKD for 4 ([C, H, L, L] each: 16 KiB a chunk and head at L = 64).
2. the forward scan: S0 (each chunk's start state) and vnew = U - W S0.
3. the backward scan: dS (the gradient of the state after each chunk) and
   dvnew = KD dS + P^T do.
4. :func:`_grads_kernel`, grid (chunk, head): :func:`_chunk_grads`' math, rearranged so that no
   [L, K] x [K, V] product with the whole state is needed twice and no term needs all of K at
   once: with dRU = T^T dvnew (the gradient of U's right-hand side b v),

       dA  = -dRU vnew^T (strictly lower)      [since W S = U - vnew and RW S = X (U - vnew)]
       dRW = -dRU S0^T                          [the gradient of W's right-hand side b e^G k]
       dP  = do vnew^T,  dkd = vnew dS^T,  dqe = do S0^T

   First a loop over V blocks (dP, dA, dv = b dRU, dbeta's v term; dRU stored, in U's buffer),
   then for each K block a loop over V blocks (software-pipelined) accumulating dkd, dqe, dRW
   [L, BK] in registers from S0, dS [BK, BV] and do, vnew, dRU [L, BV] (re-read per K block,
   from L2), after which that K block's dq and dk are final (the [L, L] factors dQK = dP D and
   dKK = dA b D are known):

       dq = dqe e^G + dQK k
       dk = dkd e^{GL-G} + dQK^T q + b e^G dRW + (dKK + dKK^T) k

   and dg, dbeta from row sums (dg = the reverse cumulative sum of dG).

Chunk bookkeeping (:func:`chunk_layout`): chunks are numbered segment by segment; chunk c holds
token rows first[c] .. min(first[c] + L, end[c]) - 1 (end: its segment's end); rows past that are
zero padding (k = v = g = beta = 0), which leaves real rows unchanged, as in the reference.

Workspace (float32, C chunks): W, KD, QE [C, H, L, K]; U, DO, vnew, dvnew [C, H, L, V]; P, T,
KKD [C, H, L, L]; S0, dS [C, H, K, V] (~1 MB a chunk and head at K = V = 256: 3.2 GB at mom-340m
B8 T2048, as much as the PyTorch path's S0 and dS and a few of its temporaries). Nothing is
gathered or scattered in PyTorch. Recomputed rather than stored: G, D, e^G, e^{GL-G} (from g, in
both kernels). Registers and shared memory on sm_90 at K = V = 256, bf16 inputs, TF32 dots
(Triton 3.9 / 3.6, ``momtune.resources.chunk_bwd_resources``), K blocks of 64: terms 4 warps,
255 / 255 registers (16 B / 0 spilled), 32 KiB; grads 8 warps, 3 stages, 249 / 255 registers
(no spills), 136 KiB. At K blocks of 32 neither spills, and both are slower (session 12).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import triton
import triton.language as tl

from momtune.errors import InputError

from .common import _solve_unit_lower
from .scan import LAYOUTS, TritonScans, _checked, backward_scan, forward_scan


@triton.jit
def _chunk_rows(first, end, g, beta, H: tl.constexpr, L: tl.constexpr, IS_DELTA: tl.constexpr):
    """This program's chunk and head: the chunk-major index ch = chunk * H + head, the row offsets
    and mask, the token-layout row index r_h = token * H + head, G = cumsum(g), GL, beta (zero for
    the gated-linear rule, IS_DELTA off), the lower-triangle mask and D_ij = exp(G_i - G_j) on and
    below the diagonal (0 above)."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    t0 = tl.load(first + i_c).to(tl.int64)
    t1 = tl.load(end + i_c).to(tl.int64)
    o_l = tl.arange(0, L)
    rows = t0 + o_l
    m_l = rows < t1
    r_h = rows * H + i_h
    gv = tl.load(g + r_h, mask=m_l, other=0.0).to(tl.float32)
    if IS_DELTA:
        b = tl.load(beta + r_h, mask=m_l, other=0.0).to(tl.float32)
    else:
        b = gv * 0.0
    G = tl.cumsum(gv, 0)
    GL = tl.sum(tl.where(o_l == L - 1, G, 0.0), 0)
    lower = o_l[:, None] >= o_l[None, :]
    D = tl.where(lower, tl.exp(tl.where(lower, G[:, None] - G[None, :], 0.0)), 0.0)
    ch = i_c.to(tl.int64) * H + i_h
    return ch, o_l, m_l, r_h, G, GL, b, lower, D


@triton.jit
def _terms_kernel(q, k, v, g, beta, do, first, end, w, u, kd, qe, p, gl, dos, tm, am, H: tl.constexpr,
                  K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  NK: tl.constexpr, NV: tl.constexpr, SOLVE: tl.constexpr, DOT: tl.constexpr,
                  IS_DELTA: tl.constexpr):
    ch, o_l, m_l, r_h, G, GL, b, lower, D = _chunk_rows(first, end, g, beta, H, L, IS_DELTA)
    KK = tl.zeros([L, L], dtype=tl.float32)
    QK = tl.zeros([L, L], dtype=tl.float32)
    for i_k in range(0, NK):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_l[:, None] & (o_k < K)[None, :]
        kb = tl.load(k + r_h[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        qb = tl.load(q + r_h[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        if IS_DELTA:
            KK = tl.dot(kb, tl.trans(kb), KK, input_precision=DOT)
        QK = tl.dot(qb, tl.trans(kb), QK, input_precision=DOT)
    if IS_DELTA:
        KKD = tl.where(o_l[:, None] > o_l[None, :], KK * D, 0.0)
    o_ll = ch * L * L + o_l[:, None] * L + o_l[None, :]
    if IS_DELTA:
        tl.store(am + o_ll, KKD)
    tl.store(p + o_ll, QK * D)
    tl.store(gl + ch, GL)
    if IS_DELTA:
        T = _solve_unit_lower(b[:, None] * KKD, L, SOLVE, DOT)
        tl.store(tm + o_ll, T)
    eG = tl.exp(G)
    eL = tl.exp(GL - G)
    for i_k in range(0, NK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = (o_k < K)[None, :]
        m = m_l[:, None] & m_k
        kb = tl.load(k + r_h[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        qb = tl.load(q + r_h[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        o_c = ch * L * K + o_l[:, None] * K + o_k[None, :]
        if IS_DELTA:
            tl.store(w + o_c, tl.dot(T, kb * (b * eG)[:, None], input_precision=DOT), mask=m_k)
        tl.store(kd + o_c, kb * eL[:, None], mask=m_k)
        tl.store(qe + o_c, qb * eG[:, None], mask=m_k)
    for i_v in range(0, NV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = (o_v < V)[None, :]
        m = m_l[:, None] & m_v
        vb = tl.load(v + r_h[:, None] * V + o_v[None, :], mask=m, other=0.0).to(tl.float32)
        dob = tl.load(do + r_h[:, None] * V + o_v[None, :], mask=m, other=0.0).to(tl.float32)
        o_c = ch * L * V + o_l[:, None] * V + o_v[None, :]
        if IS_DELTA:
            tl.store(u + o_c, tl.dot(T, vb * b[:, None], input_precision=DOT), mask=m_v)
        else:  # gated_linear: U = v (the forward scan's vnew)
            tl.store(u + o_c, vb, mask=m_v)
        tl.store(dos + o_c, dob, mask=m_v)


@triton.jit
def _grads_kernel(q, k, v, g, beta, do, first, end, vn, dvn, dru, s0, ds, tm, p, am, dq, dk, dv, dg, db,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, DOT: tl.constexpr, IS_DELTA: tl.constexpr):
    ch, o_l, m_l, r_h, G, GL, b, lower, D = _chunk_rows(first, end, g, beta, H, L, IS_DELTA)
    o_ll = ch * L * L + o_l[:, None] * L + o_l[None, :]
    if IS_DELTA:
        Tt = tl.trans(tl.load(tm + o_ll))
    eG = tl.exp(G)
    eL = tl.exp(GL - G)
    # V blocks: dP = do vnew^T, dRU = T^T dvnew, dv = b dRU, dbeta's v term, dA = -dRU vnew^T
    dP = tl.zeros([L, L], dtype=tl.float32)
    dA = tl.zeros([L, L], dtype=tl.float32)
    dbeta = tl.zeros([L], dtype=tl.float32)
    for i_v in range(0, NV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = (o_v < V)[None, :]
        m = m_l[:, None] & m_v
        r_v = r_h[:, None] * V + o_v[None, :]
        o_c = ch * L * V + o_l[:, None] * V + o_v[None, :]
        dob = tl.load(do + r_v, mask=m, other=0.0).to(tl.float32)
        if IS_DELTA:
            vb = tl.load(v + r_v, mask=m, other=0.0).to(tl.float32)
        vnb = tl.load(vn + o_c, mask=m_v, other=0.0)
        dvnb = tl.load(dvn + o_c, mask=m_v, other=0.0)
        dP = tl.dot(dob, tl.trans(vnb), dP, input_precision=DOT)
        if IS_DELTA:
            dRU = tl.dot(Tt, dvnb, input_precision=DOT)
            tl.store(dru + o_c, dRU, mask=m_v)
            tl.store(dv + r_v, (b[:, None] * dRU).to(dv.dtype.element_ty), mask=m)
            dbeta += tl.sum(vb * dRU, 1)
            dA = tl.dot(dRU, tl.trans(vnb), dA, input_precision=DOT)
        else:  # gated_linear: vnew = v, dv = dvnew
            tl.store(dv + r_v, dvnb.to(dv.dtype.element_ty), mask=m)
    if IS_DELTA:
        dA = tl.where(o_l[:, None] > o_l[None, :], -dA, 0.0)
        KKD = tl.load(am + o_ll)
    dQK = dP * D
    # D's gradient (times D, on and below the diagonal): from P = QK D and (the delta rule) A = b KK D
    if IS_DELTA:
        dKK = dA * b[:, None] * D
        dKK = dKK + tl.trans(dKK)
        dDD = tl.where(lower, dP * tl.load(p + o_ll), 0.0) + dA * b[:, None] * KKD
        dbeta += tl.sum(dA * KKD, 1)
    else:
        dDD = tl.where(lower, dP * tl.load(p + o_ll), 0.0)
    dG = tl.sum(dDD, 1) - tl.sum(dDD, 0)
    tl.debug_barrier()  # dRU, stored above, is read below by other threads of this program
    rks = tl.zeros([L], dtype=tl.float32)  # row sums of dkd * kd (GL's gradient: their total)
    sds = tl.zeros([BK], dtype=tl.float32)  # sum(dS * S0) by K row (GL's gradient through S0)
    for i_k in range(0, NK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        dkd = tl.zeros([L, BK], dtype=tl.float32)
        dqe = tl.zeros([L, BK], dtype=tl.float32)
        dRW = tl.zeros([L, BK], dtype=tl.float32)  # minus dRW (dRW = -dRU S0^T)
        for i_v in range(0, NV):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = (o_v < V)[None, :]
            o_s = ch * K * V + o_k[:, None] * V + o_v[None, :]
            m_s = m_k[:, None] & m_v
            S = tl.load(s0 + o_s, mask=m_s, other=0.0)
            dS = tl.load(ds + o_s, mask=m_s, other=0.0)
            o_c = ch * L * V + o_l[:, None] * V + o_v[None, :]
            dob = tl.load(do + r_h[:, None] * V + o_v[None, :], mask=m_l[:, None] & m_v, other=0.0).to(tl.float32)
            vnb = tl.load(vn + o_c, mask=m_v, other=0.0)
            if IS_DELTA:
                dRU = tl.load(dru + o_c, mask=m_v, other=0.0)
            dkd = tl.dot(vnb, tl.trans(dS), dkd, input_precision=DOT)
            dqe = tl.dot(dob, tl.trans(S), dqe, input_precision=DOT)
            if IS_DELTA:
                dRW = tl.dot(dRU, tl.trans(S), dRW, input_precision=DOT)
            sds += tl.sum(dS * S, 1)
        # this K block's dq and dk, each accumulator used up as soon as it can be (registers)
        r_k = r_h[:, None] * K + o_k[None, :]
        m = m_l[:, None] & m_k[None, :]
        kb = tl.load(k + r_k, mask=m, other=0.0).to(tl.float32)
        rk = tl.sum(dkd * kb, 1) * eL
        if IS_DELTA:
            kdrw = -tl.sum(kb * dRW, 1)  # the accumulator holds -dRW
            dkb = dkd * eL[:, None] - (b * eG)[:, None] * dRW
            dkb = tl.dot(dKK, kb, dkb, input_precision=DOT)
        else:
            dkb = dkd * eL[:, None]
        qb = tl.load(q + r_k, mask=m, other=0.0).to(tl.float32)
        if IS_DELTA:
            dG += tl.sum(dqe * qb, 1) * eG + b * eG * kdrw - rk
            dbeta += eG * kdrw
        else:
            dG += tl.sum(dqe * qb, 1) * eG - rk
        rks += rk
        dqb = tl.dot(dQK, kb, dqe * eG[:, None], input_precision=DOT)
        tl.store(dq + r_k, dqb.to(dq.dtype.element_ty), mask=m)
        dkb = tl.dot(tl.trans(dQK), qb, dkb, input_precision=DOT)
        tl.store(dk + r_k, dkb.to(dk.dtype.element_ty), mask=m)
    dG += tl.where(o_l == L - 1, tl.sum(rks, 0) + tl.sum(sds, 0) * tl.exp(GL), 0.0)
    dgv = tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG  # G = cumsum(g): dg_i = sum_{j >= i} dG_j
    tl.store(dg + r_h, dgv.to(dg.dtype.element_ty), mask=m_l)
    if IS_DELTA:
        tl.store(db + r_h, dbeta.to(db.dtype.element_ty), mask=m_l)


def chunk_layout(cu: list[int], L: int, device: torch.device | str) -> dict[str, Any]:
    """The chunks of segments ``cu`` (cu_seqlens as a list), numbered segment by segment:
    table [S, max(1, MAXC)] and nch [S] (int32, :mod:`.scan`'s bookkeeping), first and end [C]
    (int32: chunk c's first token row, its segment's end) and C, in one host-to-device copy."""
    nch, table_rows, first, end = [], [], [], []
    for s in range(len(cu) - 1):
        n = -(-(cu[s + 1] - cu[s]) // L)
        table_rows.append(list(range(len(first), len(first) + n)))
        nch.append(n)
        first += [cu[s] + c * L for c in range(n)]
        end += [cu[s + 1]] * n
    maxc = max(max(nch, default=0), 1)
    table = [r + [0] * (maxc - len(r)) for r in table_rows]
    S, C = len(nch), len(first)
    # every part starts on 16 bytes (4 int32s): Triton specialises a pointer argument on its
    # alignment, so parts packed back to back would start aligned or not as the ragged segments
    # fall, and each kernel would compile again for each mix (H200, session 13: the terms and
    # gradient kernels, ~16 s a compile, built again for every other input set of a search)
    parts, flat = [], []
    for part in ([x for r in table for x in r], nch, first, end):
        parts.append((len(flat), len(part)))
        flat += part + [0] * (-len(part) % 4)
    buf = torch.tensor(flat, dtype=torch.int32).to(device)
    table_t, nch_t, first_t, end_t = (buf[o:o + n] for o, n in parts)
    return dict(table=table_t.view(S, maxc), nch=nch_t, first=first_t, end=end_t, C=C)


def _contiguous(name: str, x: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return _checked(name, x, shape, device, (torch.float16, torch.bfloat16, torch.float32),
                    "float16, bfloat16 or float32")


def constants(h: int, kd: int, vd: int, L: int, block_k: int, block_v: int, dot: str,
              delta: bool = True) -> dict[str, object]:
    """Both chunk kernels' compile-time constants (blocks clamped to K, V padded to powers of two;
    IS_DELTA off: the gated-linear rule)."""
    if L < 16 or L & (L - 1):
        raise InputError(f"chunk_size: expected a power of two >= 16 (tl.dot tiles), got {L}")
    bk = min(block_k, max(16, triton.next_power_of_2(kd)))
    bv = min(block_v, max(16, triton.next_power_of_2(vd)))
    return dict(H=h, K=kd, V=vd, L=L, BK=bk, BV=bv, NK=triton.cdiv(kd, bk), NV=triton.cdiv(vd, bv), DOT=dot,
                IS_DELTA=delta)


def chunk_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor | None,
                   do: torch.Tensor, cu: list[int], *, initial_state: torch.Tensor | None = None,
                   dfinal: torch.Tensor | None = None, chunk_size: int = 64, dot: str = "tf32",
                   solve: str = "blocked", block_k: int = 64, block_v: int = 32, num_warps: int = 8,
                   num_stages: int = 3, terms_warps: int = 4, fwd_block_v: int = 64, fwd_warps: int = 8,
                   bwd_block_v: int = 64, bwd_warps: int = 8, scan_layout: str = "KV", poison: bool = False,
                   events: dict[str, list[Any]] | None = None,
                   out: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dg, dbeta) of the gated-delta recurrence over segments ``cu`` (a list of ints;
    ``cu[-1]`` = N), given the output's gradient ``do``: q, k [N, H, K] the recurrence's q
    (normalised and scaled) and k, float32; v, do [N, H, V], g, beta [N, H] in float16, bfloat16
    or float32. dq, dk come back in float32, dv, dg, dbeta in v's, g's and beta's dtypes.
    ``beta`` None: the gated-linear rule (S <- exp(g) S + k v^T), dbeta None. ``initial_state``
    [S, H, K, V] float32 (S = len(cu) - 1, as ``chunk_recurrence`` takes it; None: zeros): the
    states the segments start from, and the initial states' gradient [S, H, K, V] float32 comes
    back sixth. ``dfinal`` [S, H, K, V] float32: the gradient of the final states (None: they
    are not used). Without either, nothing of theirs is launched or allocated.
    ``poison``: every output and workspace filled with NaN first (tests).

    Launch parameters: ``block_k``, ``block_v``, ``num_warps``, ``num_stages`` (its K x V loop's
    software pipelining) of the gradient kernel; ``terms_warps`` of the terms kernel (its K and V
    blocks: ``block_k``, ``block_v``); ``fwd_block_v``, ``fwd_warps`` / ``bwd_block_v``,
    ``bwd_warps`` of the forward / backward scan, ``scan_layout`` their state layout ("KV" or "VK",
    :mod:`.scan`). Defaults (sm_90, K = V = 256, Triton 3.6, the
    H200's; tests/kernels/test_recurrence_chunk_bwd.py): K blocks of 64 (session 12 on the H200 at
    mom-340m B 8 T 2048: terms 0.85 and grads 2.76 ms against 0.97 and 3.74 at 32; the gradient
    kernel re-reads do, vnew, dRU once per K block), at which the terms kernel spills 16 B with
    Triton 3.9 (none at 32); the gradient kernel's V loop in 3 stages (2.19 ms against 2.74 at 2,
    3.31 at 1; 136 KiB of shared memory, no spills);
    the scans take V blocks of 64 (each of a segment's NV programs reads the chunk's whole W, KD,
    QE: at V blocks of 16 that is 10 GB of L2 reads at B8 T2048, at 64 2.6 GB), the forward one
    without spills, the backward one with 12 B (fewer blocks spill more: none spill nothing but
    V blocks of 16 at 4 warps); ``solve`` the terms kernel's triangular inverse ("blocked" or "forward",
    :func:`.common._solve_unit_lower`). ``events`` (CUDA, benchmarks): a pair of recorded CUDA
    events per launch appended under "terms", "forward_scan", "backward_scan", "grads". ``out``:
    buffers for "dv", "dg", "dbeta" to write (their shapes, v's, g's and beta's dtypes)."""
    n, h, kd_ = q.shape
    dev = q.device
    vd = v.shape[-1] if v.dim() == 3 else -1
    q, k = (_contiguous(nm, x, (n, h, kd_), dev) for nm, x in (("q", q), ("k", k)))
    if q.dtype != torch.float32 or k.dtype != torch.float32:
        raise InputError(f"q, k: expected float32 (normalised and scaled), got {q.dtype}, {k.dtype}")
    v, do = (_contiguous(nm, x, (n, h, vd), dev) for nm, x in (("v", v), ("do", do)))
    delta = beta is not None
    g = _contiguous("g", g, (n, h), dev)
    if delta:
        beta = _contiguous("beta", beta, (n, h), dev)
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:])):
        raise InputError(f"cu: expected non-decreasing segment bounds from 0 to {n}, got {cu[:8]}")
    if scan_layout not in LAYOUTS:
        raise InputError(f"scan_layout: expected one of {', '.join(LAYOUTS)}, got {scan_layout!r}")
    states = (len(cu) - 1, h, kd_, vd)
    if initial_state is not None:
        initial_state = _checked("initial_state", initial_state, states, dev)
    if dfinal is not None:
        dfinal = _checked("dfinal", dfinal, states, dev)
    L = chunk_size
    const = constants(h, kd_, vd, L, block_k, block_v, dot, delta)
    lay = chunk_layout(cu, L, dev)
    C = lay["C"]
    empty = torch.full if poison else (lambda shape, _, **kw: torch.empty(shape, **kw))
    nan = float("nan")
    f32 = dict(dtype=torch.float32, device=dev)
    dq, dk = (empty((n, h, kd_), nan, **f32) for _ in range(2))
    out = out or {}

    def result(name: str, like: torch.Tensor) -> torch.Tensor:
        buf = out.get(name)
        if buf is None:
            return empty(like.shape, nan, dtype=like.dtype, device=dev)
        if buf.shape != like.shape or buf.dtype != like.dtype or buf.device != dev or not buf.is_contiguous():
            raise InputError(f"out[{name!r}]: expected a contiguous {like.dtype} {tuple(like.shape)} on {dev}, got "
                             f"{buf.dtype} {tuple(buf.shape)} on {buf.device}")
        return buf

    dv, dg = result("dv", v), result("dg", g)
    db = result("dbeta", beta) if delta else None
    ds0 = None if initial_state is None else empty(states, nan, **f32)
    extra = () if ds0 is None else (ds0,)
    if C == 0 or h == 0:
        if ds0 is not None:  # no chunks: every initial state reaches the end unchanged
            ds0.copy_(dfinal) if dfinal is not None else ds0.zero_()
        return (dq, dk, dv, dg, db, *extra)
    kd, qe = (empty((C, h, L, kd_), nan, **f32) for _ in range(2))
    u, dos, dvnew = (empty((C, h, L, vd), nan, **f32) for _ in range(3))
    p = empty((C, h, L, L), nan, **f32)
    if delta:
        w = empty((C, h, L, kd_), nan, **f32)
        vnew = empty((C, h, L, vd), nan, **f32)
        tm, am = (empty((C, h, L, L), nan, **f32) for _ in range(2))
    else:  # gated_linear: no W, T, KKD; vnew is v, which the terms kernel writes into u
        w, vnew, tm, am = None, u, p, p
    gl = empty((C, h), nan, **f32)
    grid = (C, h)
    first, end = lay["first"], lay["end"]
    state0 = torch.zeros(states, **f32) if initial_state is None else initial_state
    s0, ds = (empty((C, h, kd_, vd), nan, **f32) for _ in range(2))
    bb = beta if delta else g  # a pointer the gated-linear kernels never read
    with _timed(events, "terms"):
        _terms_kernel[grid](q, k, v, g, bb, do, first, end, kd if w is None else w, u, kd, qe, p, gl, dos, tm, am,
                            **const, SOLVE=solve, num_warps=terms_warps, num_stages=1)
    with _timed(events, "forward_scan"):
        forward_scan(w, u, kd, gl, state0, lay["table"], lay["nch"], block_v=fwd_block_v, num_warps=fwd_warps,
                     dot=dot, out=s0, vnew=vnew if delta else None, layout=scan_layout)
    with _timed(events, "backward_scan"):
        state_grads = {} if ds0 is None and dfinal is None else dict(dfinal=dfinal, initial=ds0 is not None,
                                                                     out_initial=ds0)
        backward_scan(w, kd, qe, p, dos, gl, lay["table"], lay["nch"], block_v=bwd_block_v, num_warps=bwd_warps,
                      dot=dot, out=ds, dvnew=dvnew, layout=scan_layout, **state_grads)
    with _timed(events, "grads"):
        # dRU into u (U is dead after the forward scan; the gated-linear kernel reads v there)
        _grads_kernel[grid](q, k, v, g, bb, do, first, end, vnew, dvnew, u, s0, ds, tm, p, am, dq, dk, dv, dg,
                            dg if db is None else db, **const, num_warps=num_warps, num_stages=num_stages)
    return (dq, dk, dv, dg, db, *extra)


@contextlib.contextmanager
def _timed(events: dict[str, list[Any]] | None, name: str) -> Iterator[None]:
    """CUDA events recorded around the block into ``events[name]`` (nothing if ``events`` is None)."""
    if events is None:
        yield
        return
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    yield
    stop.record()
    events.setdefault(name, []).append((start, stop))


class TritonBackward(TritonScans):
    """``scans`` for :func:`momtune.reference.recurrence.recurrence_backward` (either rule, initial
    states and the final states' gradient too) that runs the whole chunk backward on Triton kernels (:func:`chunk_backward`: chunk terms, both scans, chunk
    gradients), and the L2 normalisation of q and k both ways (:mod:`.qk_norm`,
    :meth:`normalised_backward`); as :class:`.scan.TritonScans` (``dot``, ``poison``) it still
    offers the two scans alone. ``launch``: :func:`chunk_backward`'s launch parameters (its
    defaults otherwise) and ``chunk``, the backward's chunk size (the template "recurrence_bwd"
    tunes them)."""

    LAUNCH = ("solve", "block_k", "block_v", "num_warps", "num_stages", "terms_warps", "fwd_block_v", "fwd_warps",
              "bwd_block_v", "bwd_warps", "scan_layout", "chunk")

    def __init__(self, dot: str = "tf32", poison: bool = False, **launch: Any) -> None:
        unknown = sorted(set(launch) - set(self.LAUNCH))
        if unknown:
            raise InputError(f"TritonBackward: unknown launch parameters {unknown}; known: {list(self.LAUNCH)}")
        if launch.get("solve", "blocked") not in ("blocked", "forward"):
            raise InputError(f"solve: expected 'blocked' or 'forward', got {launch['solve']!r}")
        super().__init__(dot=dot, poison=poison, layout=launch.get("scan_layout", "KV"))
        self.chunk = launch.pop("chunk", None)  # the backward's own chunk size (None: the caller's)
        self.launch = launch

    def chunk_backward(self, q, k, v, g, beta, do, cu, chunk_size, out=None, initial_state=None,  # noqa: ANN001, ANN201 - recurrence_backward's protocol
                       dfinal=None):
        return chunk_backward(q, k, v, g, beta, do, cu, chunk_size=self.chunk or chunk_size, dot=self.dot,
                              poison=self.poison, out=out, initial_state=initial_state, dfinal=dfinal, **self.launch)

    def normalised_backward(self, q, k, v, g, beta, do, cu, chunk_size, scale, out=None, initial_state=None,  # noqa: ANN001, ANN201 - recurrence_backward's protocol
                            dfinal=None):
        """(dq, dk, dv, dg, dbeta) in the inputs' dtypes from the raw q, k (L2-normalised here,
        q scaled by ``scale``: :mod:`.qk_norm` both ways) and ``cu`` a list (beta None: the
        gated-linear rule, dbeta None); with ``initial_state`` the initial states' gradient
        sixth (:func:`chunk_backward`); ``out``: buffers for any of them (named so), written
        instead of new tensors."""
        from .qk_norm import l2norm_rows, l2norm_rows_backward

        out = out or {}
        (qf, rq), (kf, rk) = l2norm_rows(q, scale), l2norm_rows(k, 1.0)
        dqf, dkf, *rest = self.chunk_backward(qf, kf, v, g, beta, do, cu, chunk_size, out=out,
                                              initial_state=initial_state, dfinal=dfinal)
        del qf, kf
        dq = l2norm_rows_backward(q, rq, dqf, scale, out=out.get("dq"))
        dk = l2norm_rows_backward(k, rk, dkf, 1.0, out=out.get("dk"))
        return (dq, dk, *rest)


def _defaults() -> dict[str, Any]:
    import inspect

    params = inspect.signature(chunk_backward).parameters
    return {**{n: params[n].default for n in TritonBackward.LAUNCH if n in params}, "chunk": 64}


#: the template "recurrence_bwd"'s default: :func:`chunk_backward`'s defaults, chunks of 64
DEFAULT_CONFIG: dict[str, Any] = _defaults()
