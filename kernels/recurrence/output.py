"""Chunk-parallel output kernel of ``STATES="memory"`` (see :mod:`.chunk`).

With the per-chunk starting states S_c in a workspace (written by the sequential state pass),
every chunk's output is independent of the others::

    o = (q rq scale exp(G)) S_c + lower(q_i.k_j exp(G_i - G_j)) vnew

Grid ((N // BT + S) * H * V/BV,), V block fastest (the V blocks of a chunk share its q, Aqk
tiles in L2), then head, then chunk slot p -> segment by the pre-pass's binary search over
cu_seqlens; slots past the end of their segment return. The K contraction runs in BK blocks (pipelined by
num_stages). S_c is read in the workspace dtype: with fp32 states (``H_FP32``) q stays fp32 and
q S_c is an fp32 (tf32 on the GPU, unless DOT is "ieee") matmul; otherwise both are in the input dtype, as in the
register pass.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import _slot_segment


@triton.jit
def _output_kernel(q, v, cu, hs, vw, aqk, qt, fq, o, S,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, LOG_S: tl.constexpr,
                   IS_DELTA: tl.constexpr, PRE_QK: tl.constexpr, DOT: tl.constexpr):
    pid = tl.program_id(0)
    i_v = pid % NV  # V blocks of one chunk run side by side: q, Aqk re-reads hit L2
    i_h = ((pid // NV) % H).to(tl.int64)
    p = pid // (NV * H)
    i_s, base = _slot_segment(cu, p, S, BT, LOG_S)
    bos = tl.load(cu + i_s).to(tl.int64)
    eos = tl.load(cu + i_s + 1).to(tl.int64)
    t0 = bos + (p - base).to(tl.int64) * BT
    if t0 >= eos:
        return
    dt = o.dtype.element_ty
    hd = hs.dtype.element_ty
    o_c = tl.arange(0, BT)
    rows = t0 + o_c
    m_t = rows < eos
    r_h = rows * H + i_h
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    Aqk = tl.load(aqk + r_h[:, None] * BT + o_c[None, :], mask=m_t[:, None], other=0.0)
    if IS_DELTA:
        vn = tl.load(vw + r_h[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
    else:
        vn = tl.load(v + r_h[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
    ob = tl.dot(Aqk.to(dt), vn.to(dt), input_precision=DOT)
    if not PRE_QK:
        f_q = tl.load(fq + r_h, mask=m_t, other=0.0)
    p_h = hs + (p.to(tl.int64) * H + i_h) * K * V
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        if PRE_QK:
            qg = tl.load(qt + r_h[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        else:
            qb = tl.load(q + r_h[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
            qg = qb.to(tl.float32) * f_q[:, None]
        Sc = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        ob = tl.dot(qg.to(hd), Sc, ob, input_precision=DOT)
    tl.store(o + r_h[:, None] * V + o_v[None, :], ob.to(dt), mask=m_tv)
