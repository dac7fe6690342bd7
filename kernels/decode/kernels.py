"""Triton kernels of the MoM decode step (one new token per sequence).

Three kernels, launched in this order by :mod:`momtune.kernels.decode.step`:

``_decode_conv_kernel``     grid (B*J, H). For slot (b, j) with memory m = idx[b, j] and head h:
                            the short convs of q, k, v over (b, m)'s own windows (+ SiLU), the
                            window shift, L2 norm of q and k (q scaled), decay exp(g) and beta.
                            Writes them to an fp32 scratch [B, J, H, *]. One program owns all
                            channels of (b, m, h), so reading and shifting a window never races.
``_decode_state_kernel``    grid (cdiv(V, BV), H, B*J/JP). For JP slots (JP = J: "fused" merge,
                            JP = 1: "split"), one value block: S <- exp(g) S, the rule's update,
                            o = S^T q, and sum_j w_j o_j, all in fp32. With JP = J and BV >= V it
                            also applies the gated RMSNorm and writes y; otherwise it writes fp32
                            partial sums [B*J/JP, H, V] for the combine kernel.
``_decode_combine_kernel``  grid (B, H): sums the partial rows of (b, h) in a fixed order (no
                            atomics, deterministic) and applies the gated RMSNorm if asked.

The state update keeps a [BK, BV] tile in registers. With BK >= K (one key chunk) the delta
rule is done in one pass over the state; with several key chunks it takes two passes: the first
reduces S^T k and S^T q (o = exp(g) S^T q + u (k.q), u = beta (v - exp(g) S^T k)), the second
writes exp(g) S + k u^T (the re-read mostly hits L2). gated_linear needs one pass either way.

Reads come from ``*_src`` and writes go to ``*_dst``: the public step passes the same tensor
(in place); the tuning template writes elsewhere so repeated launches stay idempotent. Because
reads and writes may alias, every program puts a barrier between its last read of a tile and its
writes to it (replicated layouts of small tiles could otherwise read a value already updated by
another warp). Slots whose memory is outside [0, M) (e.g. -1 for padding) contribute nothing and
touch nothing.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _conv_silu(x_ptr, src_ptr, dst_ptr, w_ptr, offs, mask, C, W: tl.constexpr):
    """Depthwise causal conv of one token over its window, then SiLU; shifts the window.

    x_ptr -> x[c0], src/dst_ptr -> window[0, c0] (row stride C), w_ptr -> weight[c0, 0] (row
    stride W). Returns silu(conv) in fp32 on ``offs`` (zero where masked).
    """
    x_raw = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    acc = x * tl.load(w_ptr + offs * W + (W - 1), mask=mask, other=0.0).to(tl.float32)
    for i in tl.static_range(W - 1):
        r = tl.load(src_ptr + i * C + offs, mask=mask, other=0.0).to(tl.float32)
        acc += r * tl.load(w_ptr + offs * W + i, mask=mask, other=0.0).to(tl.float32)
    tl.debug_barrier()
    for i in tl.static_range(W - 2):
        r = tl.load(src_ptr + (i + 1) * C + offs, mask=mask, other=0.0)
        tl.debug_barrier()
        tl.store(dst_ptr + i * C + offs, r.to(dst_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()
    tl.store(dst_ptr + (W - 2) * C + offs, x_raw.to(dst_ptr.dtype.element_ty), mask=mask)
    return acc / (1.0 + tl.exp(-acc))  # silu (exp form: cheaper in the interpreter)


@triton.jit
def _decode_conv_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, idx_ptr,
    cq_src, ck_src, cv_src, cq_dst, ck_dst, cv_dst,
    wq_ptr, wk_ptr, wv_ptr, alog_ptr, dtb_ptr,
    qn_ptr, kn_ptr, vc_ptr, gb_ptr,
    scale, M, J, H, K, V,
    sq_b, sk_b, sk_m, sv_b, sv_m, sa_b, sa_m, sb_b, sb_m,
    W: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    row = tl.program_id(0)  # slot b * J + j
    h = tl.program_id(1)
    b = row // J
    m = tl.load(idx_ptr + row).to(tl.int64)
    valid = (m >= 0) & (m < M)
    m = tl.where(valid, m, 0)
    b64 = b.to(tl.int64)
    bm = b64 * M + m
    HK = H * K
    HV = H * V
    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    mk = ok < tl.where(valid, K, 0)  # (not `& valid`: keeps the interpreter's mask boolean)
    mv = ov < tl.where(valid, V, 0)
    # q: the token's q through memory m's own q window
    q = _conv_silu(q_ptr + b64 * sq_b + h * K, cq_src + bm * (W - 1) * HK + h * K,
                   cq_dst + bm * (W - 1) * HK + h * K, wq_ptr + h * K * W, ok, mk, HK, W)
    q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6) * scale
    k = _conv_silu(k_ptr + b64 * sk_b + m * sk_m + h * K, ck_src + bm * (W - 1) * HK + h * K,
                   ck_dst + bm * (W - 1) * HK + h * K, wk_ptr + h * K * W, ok, mk, HK, W)
    k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
    v = _conv_silu(v_ptr + b64 * sv_b + m * sv_m + h * V, cv_src + bm * (W - 1) * HV + h * V,
                   cv_dst + bm * (W - 1) * HV + h * V, wv_ptr + h * V * W, ov, mv, HV, W)
    rh = row.to(tl.int64) * H + h
    tl.store(qn_ptr + rh * K + ok, q, mask=ok < K)
    tl.store(kn_ptr + rh * K + ok, k, mask=ok < K)
    tl.store(vc_ptr + rh * V + ov, v, mask=ov < V)
    # decay and beta of (b, m, h)
    a = tl.load(a_ptr + b64 * sa_b + m * sa_m + h, mask=valid, other=0.0).to(tl.float32)
    x = a + tl.load(dtb_ptr + h).to(tl.float32)
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    g = -tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * softplus
    beta = 1.0 / (1.0 + tl.exp(-tl.load(b_ptr + b64 * sb_b + m * sb_m + h, mask=valid, other=0.0).to(tl.float32)))
    tl.store(gb_ptr + rh * 2, tl.exp(g))
    tl.store(gb_ptr + rh * 2 + 1, beta)


@triton.jit
def _gated_rms(acc, gate_ptr, nw_ptr, ov, mv, V, eps):
    """rms_norm(acc) * weight * silu(gate) over one head's V values (fp32)."""
    acc = tl.where(mv, acc, 0.0)
    r = tl.rsqrt(tl.sum(acc * acc, 0) / V + eps)
    gt = tl.load(gate_ptr + ov, mask=mv, other=0.0).to(tl.float32)
    nw = tl.load(nw_ptr + ov, mask=mv, other=0.0).to(tl.float32)
    return acc * r * nw * gt / (1.0 + tl.exp(-gt))


@triton.jit
def _decode_state_kernel(
    s_src, s_dst, idx_ptr, w_ptr, qn_ptr, kn_ptr, vc_ptr, gb_ptr,
    gate_ptr, nw_ptr, y_ptr,
    eps, M, J, NJ, H, K, V, sg_b,
    JP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
    ONE_PASS: tl.constexpr, DELTA: tl.constexpr, NORM: tl.constexpr,
):
    iv = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.program_id(2)  # output row: b (JP == J) or slot b * J + j (JP == 1)
    b = r // NJ
    j0 = (r % NJ) * JP
    ov = iv * BV + tl.arange(0, BV)
    mv = ov < V
    acc = tl.zeros([BV], dtype=tl.float32)
    for jj in range(JP):
        slot = b * J + j0 + jj
        m = tl.load(idx_ptr + slot).to(tl.int64)
        valid = (m >= 0) & (m < M)
        m = tl.where(valid, m, 0)
        wt = tl.where(valid, tl.load(w_ptr + slot).to(tl.float32), 0.0)
        sbase = ((b.to(tl.int64) * M + m) * H + h) * K * V
        mvs = ov < tl.where(valid, V, 0)  # state tile columns (none for an empty slot)
        rh = slot.to(tl.int64) * H + h
        v = tl.load(vc_ptr + rh * V + ov, mask=mv, other=0.0)
        decay = tl.load(gb_ptr + rh * 2)
        beta = tl.load(gb_ptr + rh * 2 + 1)
        o = tl.zeros([BV], dtype=tl.float32)
        if ONE_PASS:  # one key chunk (any rule) or gated_linear
            for kk in range(NK):
                ok = kk * BK + tl.arange(0, BK)
                mk = ok < K
                msk = mk[:, None] & mvs[None, :]
                ptrs = sbase + ok[:, None] * V + ov[None, :]
                S = tl.load(s_src + ptrs, mask=msk, other=0.0) * decay
                kv = tl.load(kn_ptr + rh * K + ok, mask=mk, other=0.0)
                qv = tl.load(qn_ptr + rh * K + ok, mask=mk, other=0.0)
                if DELTA:
                    u = beta * (v - tl.sum(S * kv[:, None], 0))
                else:
                    u = v
                S = S + kv[:, None] * u[None, :]
                o += tl.sum(S * qv[:, None], 0)
                tl.debug_barrier()
                tl.store(s_dst + ptrs, S, mask=msk)
        else:  # delta rule over several key chunks: reduce, then update
            sk = tl.zeros([BV], dtype=tl.float32)
            sq = tl.zeros([BV], dtype=tl.float32)
            kq = tl.zeros([BK], dtype=tl.float32)
            for kk in range(NK):
                ok = kk * BK + tl.arange(0, BK)
                mk = ok < K
                msk = mk[:, None] & mvs[None, :]
                S = tl.load(s_src + sbase + ok[:, None] * V + ov[None, :], mask=msk, other=0.0)
                kv = tl.load(kn_ptr + rh * K + ok, mask=mk, other=0.0)
                qv = tl.load(qn_ptr + rh * K + ok, mask=mk, other=0.0)
                sk += tl.sum(S * kv[:, None], 0)
                sq += tl.sum(S * qv[:, None], 0)
                kq += kv * qv
            u = beta * (v - decay * sk)
            o = decay * sq + u * tl.sum(kq, 0)
            for kk in range(NK):
                ok = kk * BK + tl.arange(0, BK)
                mk = ok < K
                msk = mk[:, None] & mvs[None, :]
                ptrs = sbase + ok[:, None] * V + ov[None, :]
                S = tl.load(s_src + ptrs, mask=msk, other=0.0)
                kv = tl.load(kn_ptr + rh * K + ok, mask=mk, other=0.0)
                S = S * decay + kv[:, None] * u[None, :]
                tl.debug_barrier()
                tl.store(s_dst + ptrs, S, mask=msk)
        acc += wt * o
    if NORM:  # JP == J and one value block: the whole head is here
        acc = _gated_rms(acc, gate_ptr + b.to(tl.int64) * sg_b + h * V, nw_ptr, ov, mv, V, eps)
    tl.store(y_ptr + (r.to(tl.int64) * H + h) * V + ov, acc.to(y_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _decode_combine_kernel(
    part_ptr, gate_ptr, nw_ptr, y_ptr, eps, NJ, H, V, sg_b,
    BV: tl.constexpr, NORM: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ov = tl.arange(0, BV)
    mv = ov < V
    acc = tl.zeros([BV], dtype=tl.float32)
    for j in range(NJ):
        acc += tl.load(part_ptr + ((b.to(tl.int64) * NJ + j) * H + h) * V + ov, mask=mv, other=0.0)
    if NORM:
        acc = _gated_rms(acc, gate_ptr + b.to(tl.int64) * sg_b + h * V, nw_ptr, ov, mv, V, eps)
    tl.store(y_ptr + (b.to(tl.int64) * H + h) * V + ov, acc.to(y_ptr.dtype.element_ty), mask=mv)


def grid_sizes(B: int, J: int, H: int, V: int, BV: int, JP: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """Grids of the conv and state kernels (they depend on shapes only)."""
    return (B * J, H), (triton.cdiv(V, BV), H, B * (J // JP))
