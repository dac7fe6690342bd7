"""Chunked varlen recurrence of MoM (gated delta rule / gated linear attention) in Triton.

Layout (packed varlen, see ``momtune.reference.recurrence``)::

    q, k [N, H, K]   v [N, H, V]   g [N, H] log decay   beta [N, H]   cu_seqlens int32 [S + 1]
    initial_state / final_state [S, H, K, V] fp32        o [N, H, V] in the input dtype

Per chunk of BT rows of one segment and head (G = cumsum of g inside the chunk, q and k
L2-normalised, q scaled)::

    A   = strictly_lower(beta_i k_i.k_j exp(G_i - G_j))        T = (I + A)^-1  (UT transform)
    W   = T (beta exp(G) k)        U = T (beta v)                vnew = U - W S
    o   = (q exp(G)) S + lower(q_i.k_j exp(G_i - G_j)) vnew
    S  <- exp(G_last) S + (k exp(G_last - G))^T vnew
    (gated_linear: vnew = v, no A/T/W/U)

Three kernels, one set of helpers (:mod:`.common`):

- ``_recurrence_kernel`` — grid (V/BV * H * S,): each program owns a [K, BV] block of one
  segment's state in registers and walks the segment's chunks in order (runtime loop bound read
  from cu_seqlens). With ``PREPASS`` off it computes everything above on chip (the fused single
  pass; vnew = T (beta (v - (exp(G) k) S)) so W is never formed). With ``PREPASS`` on it reads
  -W, U, the masked q.k matrix and per-row factors from memory and only does the four
  state-dependent matmuls (W S, q S, Aqk vnew, k^T vnew).
- ``_prepass_kernel`` — chunk-parallel: grid (N // BT + S, H) chunk slots; slot p belongs to the
  segment s with base(s) = cu[s] // BT + s <= p < base(s + 1) (binary search over cu_seqlens in
  the kernel), so the grid never depends on data. Writes -W [N, H, K], U [N, H, V], Aqk
  [N, H, BT] (input dtype, or fp32 with ``WU_FP32``), exp(G_last) [N, H] and either the per-row
  scale factors of q and k ([N, H] fp32) or, with ``PRE_QK``, the scaled q and k themselves.
- ``STATES`` = "register" keeps the states on chip (the sequential pass also writes o). "memory"
  is fla's split: the sequential pass (``STORE_H``) never reads q; per chunk it stores the
  starting state S_c to a workspace [N // BT + S slots, H, K, V] (input dtype, fp32 with
  ``H_FP32``) and vnew [N, H, V] (input dtype), then updates S; the chunk-parallel
  ``output._output_kernel`` (grid slots * H * V/BV) computes o from S_c, Aqk and vnew.

``STATE_LAYOUT`` (pre-pass only) picks the state pass's orientation: "KV" (``_recurrence_kernel``)
holds S [K, BV] and feeds it to the dots as their right-hand operand, which sm_90's wgmma reads
from shared memory (the state and vnew are written there every chunk, the dots wait on it); "VK"
(``_recurrence_vk_kernel``) holds S^T [BV, K] and computes every state product transposed, so the
state and vnew are the dots' left-hand operand, which wgmma reads from registers.

``SOLVE`` picks how T is computed: "blocked" (recursive block inversion, T <- T - T M T over
log2(BT) levels, 2 log2(BT) matmuls) or "forward" (row-by-row forward
substitution). Both are stable where T is bounded; the product form (I - A)(I + A^2)(I + A^4)...
is not (its powers of A grow like binomial coefficients when keys are nearly parallel) and was
removed (see common._solve_unit_lower).

Triton 3.6 on the H100 (checked there): T stays fp32 in the W/U matmuls (casting it to bf16 there
gave wrong results for some BV/K), k^T is loaded transposed rather than ``tl.trans``-ed in front
of the state update (that faulted for some warps/stages), and the fused pass needs BT*K <= 8192.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from momtune.errors import ConfigError, InputError, KernelError

from .common import _chunk_mats, _cumsum_last, _rnorm, _slot_segment
from .output import _output_kernel

RULES = ("gated_delta", "gated_linear")
SOLVE_METHODS = ("blocked", "forward")
STATES_MODES = ("register", "memory")
STATE_LAYOUTS = ("KV", "VK")
DEFAULT_CONFIG: dict[str, Any] = {
    "BT": 64, "BV": 64, "BK": 64, "num_warps": 8, "num_stages": 2,
    "PREPASS": True, "PRE_QK": False, "PRE_WARPS": 4, "SOLVE": "blocked", "WU_FP32": False,
    "STATES": "register", "H_FP32": False, "STATE_LAYOUT": "KV",
}
_CHOICES: dict[str, tuple] = {
    "BT": (16, 32, 64, 128), "BV": (16, 32, 64, 128, 256), "BK": (16, 32, 64, 128, 256),
    "num_warps": (1, 2, 4, 8, 16), "num_stages": (1, 2, 3, 4), "PREPASS": (True, False), "PRE_QK": (True, False),
    "PRE_WARPS": (1, 2, 4, 8, 16), "SOLVE": SOLVE_METHODS, "WU_FP32": (True, False),
    "STATES": STATES_MODES, "H_FP32": (True, False), "STATE_LAYOUT": STATE_LAYOUTS,
}
#: fp32 tiles take twice the shared memory: at K = 256 the default's 2 pipeline stages need
#: 377 KB on sm_90 (over the 227 KB limit), 1 stage needs 160 KB (compiled for sm_90 on the CPU).
# float32: chunks of 32. With IEEE dots (torch's default for float32 matmuls) every tl.dot is
# unrolled into FMAs; the blocked solve at BT 64 made the pre-pass take 60-140 s to compile for
# sm_90 (Triton 3.6, per specialisation: the H200's `pytest -m gpu` spent minutes there), at BT 32
# 4.6 s, the sequential pass 8.6 s (15 s at BT 64).
DTYPE_DEFAULTS: dict[torch.dtype, dict[str, Any]] = {torch.float32: {"num_stages": 1, "BT": 32}}
MAX_K = 256


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _prepass_kernel(q, k, v, g, beta, cu, w, u, aqk, qt, kt, dl, fq, fk, scale, S,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, LOG_S: tl.constexpr,
                    IS_DELTA: tl.constexpr, SOLVE: tl.constexpr, L2NORM: tl.constexpr,
                    PRE_QK: tl.constexpr, DOT: tl.constexpr):
    p = tl.program_id(0)
    i_h = tl.program_id(1).to(tl.int64)
    lo, base = _slot_segment(cu, p, S, BT, LOG_S)
    bos = tl.load(cu + lo).to(tl.int64)
    eos = tl.load(cu + lo + 1).to(tl.int64)
    t0 = bos + (p - base).to(tl.int64) * BT
    if t0 >= eos:
        return
    rows = t0 + tl.arange(0, BT)
    m_t = rows < eos
    g_t = tl.load(g + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    G, G_last = _cumsum_last(g_t, BT)
    if IS_DELTA:
        b_t = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    else:
        b_t = g_t * 0.0
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    ssk = tl.zeros([BT], dtype=tl.float32)
    ssq = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m = m_t[:, None] & (o_k[None, :] < K)
        off = (rows * H + i_h)[:, None] * K + o_k[None, :]
        kb = tl.load(k + off, mask=m, other=0.0)
        qb = tl.load(q + off, mask=m, other=0.0)
        qk = tl.dot(qb, tl.trans(kb), qk, input_precision=DOT)
        if IS_DELTA:
            kk = tl.dot(kb, tl.trans(kb), kk, input_precision=DOT)
        kf = kb.to(tl.float32)
        qf = qb.to(tl.float32)
        ssk += tl.sum(kf * kf, 1)
        ssq += tl.sum(qf * qf, 1)
    if L2NORM:
        rk = tl.rsqrt(ssk + 1e-6)
        rq = tl.rsqrt(ssq + 1e-6)
    else:
        rk = ssk * 0.0 + 1.0
        rq = ssq * 0.0 + 1.0
    T, Aqk = _chunk_mats(kk, qk, rk, rq, G, b_t, scale, BT, IS_DELTA, SOLVE, DOT)
    o_c = tl.arange(0, BT)
    tl.store(aqk + (rows * H + i_h)[:, None] * BT + o_c[None, :], Aqk.to(aqk.dtype.element_ty),
             mask=m_t[:, None])
    sq = rq * scale * tl.exp(G)
    sk = rk * tl.exp(G_last - G)
    tl.store(dl + rows * H + i_h, tl.exp(G_last) + g_t * 0.0, mask=m_t)
    if not PRE_QK:  # per-row factors: the sequential pass scales q and k without reductions
        tl.store(fq + rows * H + i_h, sq, mask=m_t)
        tl.store(fk + rows * H + i_h, sk, mask=m_t)
    if IS_DELTA or PRE_QK:
        sw = -b_t * tl.exp(G) * rk  # W is stored negated: vnew = U + W S
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m = m_t[:, None] & (o_k[None, :] < K)
            off = (rows * H + i_h)[:, None] * K + o_k[None, :]
            kf = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
            if IS_DELTA:
                wb = tl.dot(T, kf * sw[:, None], input_precision=DOT)
                tl.store(w + off, wb.to(w.dtype.element_ty), mask=m)
            if PRE_QK:
                tl.store(kt + off, (kf * sk[:, None]).to(kt.dtype.element_ty), mask=m)
                qf = tl.load(q + off, mask=m, other=0.0).to(tl.float32)
                tl.store(qt + off, (qf * sq[:, None]).to(qt.dtype.element_ty), mask=m)
    if IS_DELTA:
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            m = m_t[:, None] & (o_v[None, :] < V)
            off = (rows * H + i_h)[:, None] * V + o_v[None, :]
            vb = tl.load(v + off, mask=m, other=0.0).to(tl.float32) * b_t[:, None]
            ub = tl.dot(T, vb, input_precision=DOT)
            tl.store(u + off, ub.to(u.dtype.element_ty), mask=m)


@triton.jit
def _recurrence_kernel(q, k, v, g, beta, cu, h0, ht, o, w, u, aqk, qt, kt, dl, fq, fk, hs, vw, scale,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr,
                       BT: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                       IS_DELTA: tl.constexpr, PREPASS: tl.constexpr, PRE_QK: tl.constexpr,
                       SOLVE: tl.constexpr, L2NORM: tl.constexpr, USE_INIT: tl.constexpr,
                       STORE_FINAL: tl.constexpr, STORE_H: tl.constexpr, DOT: tl.constexpr):
    pid = tl.program_id(0)
    i_v = pid % NV
    i_sh = (pid // NV).to(tl.int64)
    i_s = i_sh // H
    i_h = i_sh % H
    bos = tl.load(cu + i_s).to(tl.int64)
    eos = tl.load(cu + i_s + 1).to(tl.int64)
    dt = k.dtype.element_ty

    o_k = tl.arange(0, KP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    o_c = tl.arange(0, BT)
    o_state = o_k[:, None] * V + o_v[None, :]
    p_state = i_sh * K * V + o_state
    m_state = m_k[:, None] & m_v[None, :]
    if USE_INIT:
        S = tl.load(h0 + p_state, mask=m_state, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([KP, BV], dtype=tl.float32)
    p_h = hs  # scalar pointer to S_c of chunk c: slots from cu[s] // BT + s (the pre-pass's scheme)
    if STORE_H:
        p_h = hs + ((bos // BT + i_s) * H + i_h) * K * V

    n_chunks = tl.cdiv(eos - bos, BT)
    for c in range(0, n_chunks):
        rows = bos + c * BT + o_c
        m_t = rows < eos
        r_hk = (rows * H + i_h)[:, None]
        m_qk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        # k^T tiles [KP, BT] are loaded transposed (no tl.trans in front of the state update)
        p_kT = (rows * H + i_h)[None, :] * K + o_k[:, None]
        m_kT = m_k[:, None] & m_t[None, :]
        if STORE_H:  # S_c, the chunk's starting state, for the output kernel
            tl.store(p_h + o_state, S.to(hs.dtype.element_ty), mask=m_state)
            p_h += H * K * V
        if PRE_QK:
            # q, k already normalised and decay-scaled by the pre-pass
            if not STORE_H:
                qg = tl.load(qt + r_hk * K + o_k[None, :], mask=m_qk, other=0.0)
            kdT = tl.load(kt + p_kT, mask=m_kT, other=0.0)
            d_last = tl.load(dl + (bos + c * BT) * H + i_h)
        elif PREPASS:
            # per-row factors from the pre-pass: rq scale exp(G), rk exp(G_last - G), exp(G_last)
            if not STORE_H:
                qb = tl.load(q + r_hk * K + o_k[None, :], mask=m_qk, other=0.0)
                f_q = tl.load(fq + rows * H + i_h, mask=m_t, other=0.0)
                qg = (qb.to(tl.float32) * f_q[:, None]).to(dt)
            kbT = tl.load(k + p_kT, mask=m_kT, other=0.0)
            f_k = tl.load(fk + rows * H + i_h, mask=m_t, other=0.0)
            kdT = (kbT.to(tl.float32) * f_k[None, :]).to(dt)
            d_last = tl.load(dl + (bos + c * BT) * H + i_h)
        else:
            qb = tl.load(q + r_hk * K + o_k[None, :], mask=m_qk, other=0.0)
            kb = tl.load(k + r_hk * K + o_k[None, :], mask=m_qk, other=0.0)
            g_t = tl.load(g + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
            G, G_last = _cumsum_last(g_t, BT)
            rq = _rnorm(qb.to(tl.float32), L2NORM)
            rk = _rnorm(kb.to(tl.float32), L2NORM)
            qg = (qb.to(tl.float32) * (rq * scale * tl.exp(G))[:, None]).to(dt)
            kbT = tl.load(k + p_kT, mask=m_kT, other=0.0)
            kdT = (kbT.to(tl.float32) * (rk * tl.exp(G_last - G))[None, :]).to(dt)
            d_last = tl.exp(G_last)
        Sq = S.to(kdT.dtype)
        if PREPASS:
            if not STORE_H:
                Aqk = tl.load(aqk + r_hk * BT + o_c[None, :], mask=m_t[:, None], other=0.0)
            if IS_DELTA:
                wb = tl.load(w + r_hk * K + o_k[None, :], mask=m_qk, other=0.0)
                ub = tl.load(u + r_hk * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
                vnew = ub + tl.dot(wb, S.to(wb.dtype), input_precision=DOT)  # W stored negated: U - W S
            else:
                vnew = tl.load(v + r_hk * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        else:
            if IS_DELTA:
                b_t = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
                kk = tl.dot(kb, tl.trans(kb), input_precision=DOT)
            else:
                b_t = g_t * 0.0
                kk = tl.zeros([BT, BT], dtype=tl.float32)
            qk = tl.dot(qb, tl.trans(kb), input_precision=DOT)
            T, Aqk = _chunk_mats(kk, qk, rk, rq, G, b_t, scale, BT, IS_DELTA, SOLVE, DOT)
            vb = tl.load(v + r_hk * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            if IS_DELTA:
                kg = (kb.to(tl.float32) * (rk * tl.exp(G))[:, None]).to(dt)
                R = b_t[:, None] * (vb - tl.dot(kg, Sq, input_precision=DOT))
                vnew = tl.dot(T, R, input_precision=DOT)
            else:
                vnew = vb
        vn = vnew.to(kdT.dtype)
        if STORE_H:
            if IS_DELTA:
                tl.store(vw + r_hk * V + o_v[None, :], vn.to(vw.dtype.element_ty), mask=m_tv)
        else:
            ob = tl.dot(qg, Sq, input_precision=DOT)
            ob = tl.dot(Aqk.to(qg.dtype), vn, ob, input_precision=DOT)
            tl.store(o + r_hk * V + o_v[None, :], ob.to(o.dtype.element_ty), mask=m_tv)
        S = S * d_last + tl.dot(kdT, vn, input_precision=DOT)
    if STORE_FINAL:
        tl.store(ht + p_state, S, mask=m_state)


@triton.jit
def _recurrence_vk_kernel(q, k, v, cu, h0, ht, o, w, u, aqk, qt, kt, dl, fq, fk, hs, vw,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr,
                          BT: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                          IS_DELTA: tl.constexpr, PRE_QK: tl.constexpr, USE_INIT: tl.constexpr,
                          STORE_FINAL: tl.constexpr, STORE_H: tl.constexpr, DOT: tl.constexpr):
    """The sequential pass of ``STATE_LAYOUT="VK"`` (pre-pass required): the state block is held
    transposed, S^T [BV, KP] fp32, so that every state-dependent matmul takes a register operand
    on the left (the state, or vnew^T) and a tile loaded from memory on the right::

        vnew^T = U^T + S^T (-W)^T      o^T = S^T (q scale exp(G))^T + vnew^T Aqk^T
        S^T   <- exp(G_last) S^T + vnew^T (k exp(G_last - G))

    On sm_90 Triton issues these as wgmma with A in registers (mma.sync for BV < 64): the state
    never goes through shared memory; the right-hand tiles are the pipelined loads (num_stages).
    Same grid, workspaces and outputs as ``_recurrence_kernel`` with PREPASS."""
    pid = tl.program_id(0)
    i_v = pid % NV
    i_sh = (pid // NV).to(tl.int64)
    i_s = i_sh // H
    i_h = i_sh % H
    bos = tl.load(cu + i_s).to(tl.int64)
    eos = tl.load(cu + i_s + 1).to(tl.int64)
    dt = k.dtype.element_ty

    o_k = tl.arange(0, KP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    o_c = tl.arange(0, BT)
    o_stT = o_k[None, :] * V + o_v[:, None]  # S^T[j, i] = S[i, j]: [BV, KP] over the [K, V] layout
    m_stT = m_v[:, None] & m_k[None, :]
    if USE_INIT:
        ST = tl.load(h0 + i_sh * K * V + o_stT, mask=m_stT, other=0.0).to(tl.float32)
    else:
        ST = tl.zeros([BV, KP], dtype=tl.float32)
    p_h = hs
    if STORE_H:
        p_h = hs + ((bos // BT + i_s) * H + i_h) * K * V

    n_chunks = tl.cdiv(eos - bos, BT)
    for c in range(0, n_chunks):
        rows = bos + c * BT + o_c
        m_t = rows < eos
        r_h = rows * H + i_h
        m_kt = m_k[:, None] & m_t[None, :]  # [KP, BT] tiles (transposed loads)
        m_tk = m_t[:, None] & m_k[None, :]  # [BT, KP]
        m_vt = m_v[:, None] & m_t[None, :]  # [BV, BT]
        if STORE_H:  # S_c, the chunk's starting state, for the output kernel ([K, V] layout)
            tl.store(p_h + o_stT, ST.to(hs.dtype.element_ty), mask=m_stT)
            p_h += H * K * V
        d_last = tl.load(dl + (bos + c * BT) * H + i_h)
        if PRE_QK:
            kd = tl.load(kt + r_h[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
            if not STORE_H:
                qgT = tl.load(qt + r_h[None, :] * K + o_k[:, None], mask=m_kt, other=0.0)
        else:
            kb = tl.load(k + r_h[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
            f_k = tl.load(fk + r_h, mask=m_t, other=0.0)
            kd = (kb.to(tl.float32) * f_k[:, None]).to(dt)
            if not STORE_H:
                qbT = tl.load(q + r_h[None, :] * K + o_k[:, None], mask=m_kt, other=0.0)
                f_q = tl.load(fq + r_h, mask=m_t, other=0.0)
                qgT = (qbT.to(tl.float32) * f_q[None, :]).to(dt)
        Sb = ST.to(kd.dtype)
        if IS_DELTA:
            wT = tl.load(w + r_h[None, :] * K + o_k[:, None], mask=m_kt, other=0.0)
            uT = tl.load(u + r_h[None, :] * V + o_v[:, None], mask=m_vt, other=0.0).to(tl.float32)
            vnT = tl.dot(ST.to(wT.dtype), wT, uT, input_precision=DOT)  # W stored negated: U - W S
        else:
            vnT = tl.load(v + r_h[None, :] * V + o_v[:, None], mask=m_vt, other=0.0).to(tl.float32)
        vnb = vnT.to(kd.dtype)
        if STORE_H:
            if IS_DELTA:
                tl.store(vw + r_h[None, :] * V + o_v[:, None], vnb.to(vw.dtype.element_ty), mask=m_vt)
        else:
            AT = tl.load(aqk + r_h[None, :] * BT + o_c[:, None], mask=m_t[None, :], other=0.0)  # Aqk^T
            oT = tl.dot(Sb, qgT, input_precision=DOT)
            oT = tl.dot(vnb, AT.to(kd.dtype), oT, input_precision=DOT)
            tl.store(o + r_h[None, :] * V + o_v[:, None], oT.to(o.dtype.element_ty), mask=m_vt)
        ST = ST * d_last + tl.dot(vnb, kd, input_precision=DOT)
    if STORE_FINAL:
        tl.store(ht + i_sh * K * V + o_stT, ST, mask=m_stT)


# ----------------------------------------------------------------------------- launcher

def resolve_config(config: Mapping[str, Any] | None, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Merge ``config`` over the defaults (of ``dtype``); unknown keys or values raise ConfigError."""
    cfg = dict(DEFAULT_CONFIG)
    cfg.update(DTYPE_DEFAULTS.get(dtype, {}))
    for key, value in (config or {}).items():
        if key not in _CHOICES:
            raise ConfigError(f"recurrence config: unknown parameter {key!r}; known: {', '.join(_CHOICES)}")
        if value not in _CHOICES[key] or isinstance(value, bool) != isinstance(_CHOICES[key][0], bool):
            raise ConfigError(f"recurrence config: {key}={value!r} not accepted; choose one of {_CHOICES[key]}")
        cfg[key] = value
    return cfg


def _check(name: str, x: Any, shape: tuple, dtypes: tuple, device: torch.device) -> torch.Tensor:
    from momtune.checks import check_tensor

    check_tensor(name, x, shape=shape, dtypes=dtypes)
    if x.device != device:
        raise InputError(f"{name}: on device {x.device}, expected {device} (the device of q)")
    return x.contiguous()


def chunk_recurrence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor | None,
    cu_seqlens: torch.Tensor, *, rule: str = "gated_delta", scale: float | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = True,
    use_qk_l2norm: bool = True, config: Mapping[str, Any] | None = None,
    out: torch.Tensor | None = None, final_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked recurrence over packed varlen segments; returns (o [N,H,V], final_state [S,H,K,V] fp32).

    Never reads cu_seqlens on the host (CUDA-graph capturable). ``config``: template parameters
    (see ``search_spaces/recurrence.toml``); missing keys take the defaults.
    """
    from momtune.checks import check_choice, check_tensor

    check_choice("rule", rule, RULES)
    io = (torch.float16, torch.bfloat16, torch.float32)
    fl = io + (torch.float64,)
    check_tensor("q", q, ndim=3, dtypes=io)
    n, h, kd = q.shape
    dev = q.device
    if not 1 <= kd <= MAX_K:
        raise InputError(f"q: key size K={kd} not supported; accepted 1..{MAX_K}")
    q = _check("q", q, (n, h, kd), io, dev)
    k = _check("k", k, (n, h, kd), (q.dtype,), dev)
    check_tensor("v", v, ndim=3)
    vd = v.shape[2]
    v = _check("v", v, (n, h, None), (q.dtype,), dev)
    if vd < 1:
        raise InputError("v: value size V must be >= 1")
    g = _check("g", g, (n, h), fl, dev)
    is_delta = rule == "gated_delta"
    if is_delta:
        beta = _check("beta", beta, (n, h), fl, dev)
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
    if cu_seqlens.device != dev:
        raise InputError(f"cu_seqlens: on device {cu_seqlens.device}, expected {dev} (the device of q)")
    if cu_seqlens.numel() < 2:
        raise InputError(f"cu_seqlens: needs at least 2 entries (one segment), got {cu_seqlens.numel()}")
    cu_seqlens = cu_seqlens.contiguous()
    s = cu_seqlens.numel() - 1
    if initial_state is not None:
        initial_state = _check("initial_state", initial_state, (s, h, kd, vd), fl, dev)
    scale = kd ** -0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty(n, h, vd, dtype=q.dtype, device=dev)
    else:
        _check("out", out, (n, h, vd), (q.dtype,), dev)
        if not out.is_contiguous():
            raise InputError("out: must be contiguous")
    if output_final_state:
        if final_state is None:
            final_state = torch.empty(s, h, kd, vd, dtype=torch.float32, device=dev)
        else:
            _check("final_state", final_state, (s, h, kd, vd), (torch.float32,), dev)
            if not final_state.is_contiguous():
                raise InputError("final_state: must be contiguous")
    else:
        final_state = None
    if dev.type != "cuda":
        from momtune.settings import interpreter_mode

        if not interpreter_mode():
            raise KernelError(f"chunk_recurrence: tensors on {dev}; Triton needs CUDA or TRITON_INTERPRET=1")
    if n == 0:
        if final_state is not None:
            final_state.copy_(initial_state if initial_state is not None else torch.zeros_like(final_state))
        return out, final_state

    launches = plan(q, k, v, g, beta, cu_seqlens, out, final_state, initial_state, is_delta, scale,
                    use_qk_l2norm, resolve_config(config, q.dtype))
    for fn in launches:
        fn()
    return out, final_state


class KernelSpec(NamedTuple):
    fn: Any  # the @triton.jit kernel
    grid: tuple[int, ...]
    const: dict[str, Any]  # constexpr arguments
    num_warps: int
    num_stages: int


def dot_precision(dtype: torch.dtype) -> str:
    """How the kernels' float32 ``tl.dot``s run: TF32 for bf16/fp16 inputs (their own rounding is
    coarser); for float32 inputs IEEE float32 unless TF32 is chosen (``MOMTUNE_FP32_PRECISION=tf32``,
    or by default where torch allows TF32 for float32 matmuls:
    ``torch.backends.cuda.matmul.allow_tf32``, e.g. ``torch.set_float32_matmul_precision("high")``;
    :func:`momtune.settings.fp32_uses_tf32`). A float32 layer was 1.8e-3 from float64 in TF32,
    1.9e-6 in IEEE, on the H200."""
    from momtune.settings import fp32_uses_tf32

    if dtype == torch.float32 and not fp32_uses_tf32():
        return "ieee"
    return "tf32"


def kernel_specs(cfg: Mapping[str, Any], *, n: int, s: int, h: int, kd: int, vd: int, is_delta: bool = True,
                 l2norm: bool = True, use_init: bool = True, store_final: bool = True,
                 dot: str = "tf32") -> dict[str, KernelSpec]:
    """The kernels one call launches, in order ("prepass", "recurrence", "output"), with grids from
    shapes only; shared by :func:`plan` and ``momtune.resources`` (compiling for sm_90 on the CPU).
    ``dot``: the float32 dots' precision (:func:`dot_precision`)."""
    BT = cfg["BT"]
    kp = max(16, triton.next_power_of_2(kd))
    BV = min(cfg["BV"], max(16, triton.next_power_of_2(vd)))
    BK = min(cfg["BK"], kp)
    nv, slots, log_s = triton.cdiv(vd, BV), n // BT + s, max(1, s.bit_length())
    prepass = cfg["PREPASS"]
    pre_qk = prepass and cfg["PRE_QK"]
    mem = cfg["STATES"] == "memory"
    if mem and not prepass:
        raise ConfigError("recurrence config: STATES='memory' needs PREPASS=True (it reads W, U and q.k from it)")
    vk = cfg["STATE_LAYOUT"] == "VK"
    if vk and not prepass:
        raise ConfigError("recurrence config: STATE_LAYOUT='VK' needs PREPASS=True (it reads W, U and q.k from it)")
    specs = {}
    if prepass:
        specs["prepass"] = KernelSpec(_prepass_kernel, (slots, h), dict(
            H=h, K=kd, V=vd, BT=BT, BK=BK, BV=BV, LOG_S=log_s, IS_DELTA=is_delta, SOLVE=cfg["SOLVE"],
            L2NORM=l2norm, PRE_QK=pre_qk, DOT=dot), cfg["PRE_WARPS"], 1)
    if vk:
        specs["recurrence"] = KernelSpec(_recurrence_vk_kernel, (nv * h * s,), dict(
            H=h, K=kd, V=vd, KP=kp, BT=BT, BV=BV, NV=nv, IS_DELTA=is_delta, PRE_QK=pre_qk, USE_INIT=use_init,
            STORE_FINAL=store_final, STORE_H=mem, DOT=dot), cfg["num_warps"], cfg["num_stages"])
    else:
        specs["recurrence"] = KernelSpec(_recurrence_kernel, (nv * h * s,), dict(
            H=h, K=kd, V=vd, KP=kp, BT=BT, BV=BV, NV=nv, IS_DELTA=is_delta, PREPASS=prepass, PRE_QK=pre_qk,
            SOLVE=cfg["SOLVE"], L2NORM=l2norm, USE_INIT=use_init, STORE_FINAL=store_final, STORE_H=mem, DOT=dot),
            cfg["num_warps"], cfg["num_stages"])
    if mem:
        specs["output"] = KernelSpec(_output_kernel, (slots * h * nv,), dict(
            H=h, K=kd, V=vd, BT=BT, BK=BK, BV=BV, NV=nv, LOG_S=log_s, IS_DELTA=is_delta, PRE_QK=pre_qk, DOT=dot),
            cfg["PRE_WARPS"], cfg["num_stages"])
    return specs


def plan(q, k, v, g, beta, cu_seqlens, out, final_state, initial_state, is_delta, scale,
         use_qk_l2norm, cfg) -> list:
    """The kernel launches of one call as closures (see :func:`kernel_specs`); allocates the
    workspaces. Inputs are checked by :func:`chunk_recurrence`."""
    n, h, kd = q.shape
    vd, s, dev = v.shape[2], cu_seqlens.numel() - 1, q.device
    specs = kernel_specs(cfg, n=n, s=s, h=h, kd=kd, vd=vd, is_delta=is_delta, l2norm=use_qk_l2norm,
                         use_init=initial_state is not None, store_final=final_state is not None,
                         dot=dot_precision(q.dtype))
    BT = cfg["BT"]
    dummy = out
    w = u = aqk = qt = kt = dl = fq = fk = hs = vw = dummy
    if "prepass" in specs:
        ws = torch.float32 if cfg["WU_FP32"] else q.dtype
        aqk = torch.empty(n, h, BT, dtype=ws, device=dev)
        if is_delta:
            w = torch.empty(n, h, kd, dtype=ws, device=dev)
            u = torch.empty(n, h, vd, dtype=ws, device=dev)
        dl = torch.empty(n, h, dtype=torch.float32, device=dev)
        if cfg["PRE_QK"]:
            qt = torch.empty(n, h, kd, dtype=ws, device=dev)
            kt = torch.empty(n, h, kd, dtype=ws, device=dev)
        else:
            fq = torch.empty(n, h, dtype=torch.float32, device=dev)
            fk = torch.empty(n, h, dtype=torch.float32, device=dev)
    mem = "output" in specs
    if mem:  # S_c per chunk slot (N // BT + S of them) and vnew per row
        hs = torch.empty(n // BT + s, h, kd, vd, dtype=torch.float32 if cfg["H_FP32"] else q.dtype, device=dev)
        if is_delta:
            vw = torch.empty(n, h, vd, dtype=q.dtype, device=dev)
    bb = beta if is_delta else g
    h0 = initial_state if initial_state is not None else dummy
    ht = final_state if final_state is not None else dummy
    qs = dummy if mem else q  # the memory state pass never reads q
    args = {
        "prepass": (q, k, v, g, bb, cu_seqlens, w, u, aqk, qt, kt, dl, fq, fk, scale, s),
        "recurrence": ((qs, k, v, cu_seqlens, h0, ht, out, w, u, aqk, qt, kt, dl, fq, fk, hs, vw)
                       if cfg["STATE_LAYOUT"] == "VK" else
                       (qs, k, v, g, bb, cu_seqlens, h0, ht, out, w, u, aqk, qt, kt, dl, fq, fk, hs, vw, scale)),
        "output": (q, v, cu_seqlens, hs, vw, aqk, qt, fq, out, s),
    }
    return [lambda sp=sp, a=args[name]: sp.fn[sp.grid](*a, **sp.const, num_warps=sp.num_warps,
                                                       num_stages=sp.num_stages)
            for name, sp in specs.items()]
