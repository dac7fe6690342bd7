"""Triton helpers shared by the recurrence kernels (:mod:`.chunk`, :mod:`.output`)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _solve_unit_lower(A, BT: tl.constexpr, SOLVE: tl.constexpr, DOT: tl.constexpr):
    """(I + A)^-1 for a strictly lower-triangular fp32 [BT, BT] tile A.

    Both methods stay bounded where T is: with nearly parallel keys, beta near 1 and little decay
    A is close to the all-ones strict lower triangle, whose inverse is bidiagonal, while its powers
    grow like binomial coefficients (A^32 reaches 1e18 at BT 64): the product form
    (I - A)(I + A^2)(I + A^4)... that this kernel once used gave outputs of 1e18 there even in
    float32, and 0.25-0.9 relative error on a trained mom-340m's bf16 layers."""
    r = tl.arange(0, BT)
    eye = (r[:, None] == r[None, :]).to(tl.float32)
    if SOLVE == "blocked":
        # recursive block inversion: T holds the inverses of the diagonal blocks of size s; with
        # M the blocks of A below them inside blocks of size 2s, [[X, 0], [A21, Y^-1]]^-1 is
        # [[X, 0], [-Y A21 X, Y]], i.e. T <- T - T M T: log2(BT) - 1 levels of two matmuls after the first (DOT: TF32
        # on the GPU like every fp32 tl.dot here, IEEE for float32 inputs unless torch allows TF32;
        # 3-pass TF32 tripled the compile time)
        # level 0 (blocks of 1, T = I) needs no product: T - I M I = I - M, exactly
        T = eye - tl.where(((r[:, None] % 2) == 1) & (r[None, :] == r[:, None] - 1), A, 0.0)
        for lvl in tl.static_range(1, BT.bit_length() - 1):
            blk = r >> lvl
            M = tl.where(((blk[:, None] % 2) == 1) & (blk[None, :] == blk[:, None] - 1), A, 0.0)
            T = T - tl.dot(tl.dot(T, M, input_precision=DOT), T, input_precision=DOT)
    else:
        # forward substitution: row i of T is e_i - sum_{j<i} A_ij T_j
        T = eye
        for i in range(1, BT):
            sel = r[:, None] == i
            a_i = tl.sum(tl.where(sel, A, 0.0), 0)  # A[i, :]
            t_i = tl.sum(a_i[:, None] * T, 0)
            T = tl.where(sel, T - t_i[None, :], T)
    return T


@triton.jit
def _chunk_mats(kk, qk, rk, rq, G, b, scale, BT: tl.constexpr, IS_DELTA: tl.constexpr,
                SOLVE: tl.constexpr, DOT: tl.constexpr):
    """From the raw Gram tiles kk = k k^T, qk = q k^T and the row norms: (T, Aqk)."""
    r = tl.arange(0, BT)
    lower = r[:, None] >= r[None, :]
    diff = tl.where(lower, G[:, None] - G[None, :], 0.0)
    decay = tl.where(lower, tl.exp(diff), 0.0)
    Aqk = qk * ((rq * scale)[:, None] * rk[None, :]) * decay
    if IS_DELTA:
        strict = r[:, None] > r[None, :]
        A = tl.where(strict, kk * ((b * rk)[:, None] * rk[None, :]) * decay, 0.0)
        T = _solve_unit_lower(A, BT, SOLVE, DOT)
    else:
        T = decay  # unused
    return T, Aqk


@triton.jit
def _cumsum_last(g, BT: tl.constexpr):
    G = tl.cumsum(g, 0)
    G_last = tl.sum(tl.where(tl.arange(0, BT) == BT - 1, G, 0.0), 0)
    return G, G_last


@triton.jit
def _rnorm(x, L2NORM: tl.constexpr):
    if L2NORM:
        return tl.rsqrt(tl.sum(x * x, 1) + 1e-6)
    else:
        return tl.sum(x * 0.0, 1) + 1.0


@triton.jit
def _slot_segment(cu, p, S, BT: tl.constexpr, LOG_S: tl.constexpr):
    """Segment of chunk slot p and that segment's first slot: the largest s with
    base(s) = cu[s] // BT + s <= p (binary search over cu_seqlens, LOG_S steps).

    Slots base(s) .. base(s + 1) - 1 hold segment s's chunks (at least cdiv(len, BT) of them, the
    last possibly empty), so N // BT + S slots cover any lengths: grids and workspaces sized from
    shapes only."""
    lo = p * 0
    hi = p * 0 + S - 1
    for _ in range(LOG_S):
        mid = (lo + hi + 1) // 2
        ok = tl.load(cu + mid).to(tl.int32) // BT + mid <= p
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    base = tl.load(cu + lo).to(tl.int32) // BT + lo
    return lo, base
