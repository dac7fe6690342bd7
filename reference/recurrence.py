"""Ground-truth recurrences of MoM's memory update, over packed varlen segments.

Layout (packed, varlen): tokens of all segments lie back to back along the first axis.

    q, k  [N, H, K]      v [N, H, V]      g [N, H] (log decay, <= 0)      beta [N, H]
    cu_seqlens [S + 1]   segment s is rows cu_seqlens[s]:cu_seqlens[s+1] (may be empty)
    initial_state / final_state [S, H, K, V]

Update rules (per head, state S [K, V], q and k optionally L2-normalised, eps 1e-6):

    gated_delta:   S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = scale S^T q_t
    gated_linear:  S <- exp(g_t) S + k_t v_t^T;                                o_t = scale S^T q_t

``recurrent_naive`` walks token by token (the ground truth); ``recurrent_chunked`` computes the
same function chunk by chunk (WY form of the delta rule), is differentiable and fast enough for
CPU tests. Both compute in float32 (float64 for float64 inputs); outputs are cast back to the
input dtype and states stay in the compute dtype.
"""
from __future__ import annotations

from typing import Any

import torch

RULES = ("gated_delta", "gated_linear")
L2_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last axis."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(q, k, v, g, beta, cu_seqlens, rule, scale, initial_state, use_qk_l2norm, values=True, qk=True):
    """Checked inputs in the compute dtype: q, k (L2-normalised, q scaled), v, g, beta, the segment
    bounds as a list and the initial states; ``values`` False: q, k and the bounds only (v, g, beta
    and the states None); ``qk`` False too: the bounds only (q, k None, as checked)."""
    from momtune.checks import check_choice, check_cu_seqlens, check_tensor
    from momtune.checks import FLOAT_DTYPES

    check_choice("rule", rule, RULES)
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    n, h, kd = q.shape
    check_tensor("k", k, shape=(n, h, kd), dtypes=FLOAT_DTYPES)
    check_tensor("v", v, shape=(n, h, None), dtypes=FLOAT_DTYPES)
    check_tensor("g", g, shape=(n, h), dtypes=FLOAT_DTYPES)
    if rule == "gated_delta":
        check_tensor("beta", beta, shape=(n, h), dtypes=FLOAT_DTYPES)
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, n], dtype=torch.int64)
    check_cu_seqlens("cu_seqlens", cu_seqlens, n)
    cu = [int(c) for c in cu_seqlens.tolist()]
    s, vd = len(cu) - 1, v.shape[-1]
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(s, h, kd, vd), dtypes=FLOAT_DTYPES)
    if not qk:
        return None, None, None, None, None, cu, None
    cd = compute_dtype(q.dtype)
    scale = kd ** -0.5 if scale is None else float(scale)
    qf, kf = q.to(cd), k.to(cd)
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    qf = qf * scale
    if not values:
        return qf, kf, None, None, None, cu, None
    vf, gf = v.to(cd), g.to(cd)
    bf = beta.to(cd) if rule == "gated_delta" else None
    if initial_state is None:
        state0 = torch.zeros(s, h, kd, vd, dtype=cd, device=q.device)
    else:
        state0 = initial_state.to(cd)
    return qf, kf, vf, gf, bf, cu, state0


def recurrent_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor | None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    rule: str = "gated_delta",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence. Returns (o [N, H, V] in q's dtype, final_state [S, H, K, V])."""
    qf, kf, vf, gf, bf, cu, state0 = _prepare(q, k, v, g, beta, cu_seqlens, rule, scale, initial_state, use_qk_l2norm)
    o = torch.zeros_like(vf)
    finals = []
    for s in range(len(cu) - 1):
        S = state0[s].clone()  # [H, K, V]
        for t in range(cu[s], cu[s + 1]):
            S = S * gf[t].exp()[:, None, None]
            if rule == "gated_delta":
                pred = torch.einsum("hk,hkv->hv", kf[t], S)
                S = S + torch.einsum("hk,hv->hkv", kf[t], bf[t][:, None] * (vf[t] - pred))
            else:
                S = S + torch.einsum("hk,hv->hkv", kf[t], vf[t])
            o[t] = torch.einsum("hk,hkv->hv", qf[t], S)
        finals.append(S)
    final = torch.stack(finals) if finals else state0
    return o.to(q.dtype), final


def _chunk_step(qc, kc, vc, gc, bc, S, rule):
    """One chunk of L tokens for A segments at once: qc, kc [A, L, H, K], vc [A, L, H, V],
    gc, bc [A, L, H], S [A, H, K, V]. Padding rows (k = v = g = beta = 0, after the real ones)
    leave the state and the real rows' outputs unchanged."""
    L = qc.shape[1]
    G = gc.cumsum(1).transpose(1, 2)  # [A, H, L] cumulative log decay within the chunk
    q, k, v = (x.transpose(1, 2) for x in (qc, kc, vc))  # [A, H, L, *]
    diff = G[..., :, None] - G[..., None, :]  # [A, H, L, L]  G_i - G_j
    lower = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    decay = torch.where(lower, diff, torch.full_like(diff, float("-inf"))).exp()  # 0 above the diagonal
    if rule == "gated_delta":
        b = bc.transpose(1, 2)[..., None]  # [A, H, L, 1]
        strict = lower & ~torch.eye(L, dtype=torch.bool, device=q.device)
        A = torch.where(strict, b * (k @ k.transpose(-1, -2)) * decay, torch.zeros_like(decay))
        eye = torch.eye(L, dtype=q.dtype, device=q.device).expand_as(A)
        # (I + A) is unit lower triangular: W and U by triangular solves (the UT/WY transform)
        W = torch.linalg.solve_triangular(eye + A, b * G.exp()[..., None] * k, upper=False, unitriangular=True)
        U = torch.linalg.solve_triangular(eye + A, b * v, upper=False, unitriangular=True)
        vnew = U - W @ S
    else:
        vnew = v
    o = (q * G.exp()[..., None]) @ S + ((q @ k.transpose(-1, -2)) * decay) @ vnew
    G_last = G[..., -1:]  # [A, H, 1]
    S = G_last.exp()[..., None] * S + (k * (G_last - G).exp()[..., None]).transpose(-1, -2) @ vnew
    return o.transpose(1, 2), S


def recurrent_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor | None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    rule: str = "gated_delta",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form of :func:`recurrent_naive` (same arguments plus ``chunk_size``); differentiable.

    Step c runs chunk c of every segment that has one, all segments in one batched step (a
    segment's last chunk is padded with zero rows), so the Python loop is as long as the longest
    segment's chunk count, not the total: the float64 check of a 49,152-token problem on a GPU
    takes tens of steps instead of hundreds.
    """
    from momtune.checks import check_int

    check_int("chunk_size", chunk_size, lo=1)
    qf, kf, vf, gf, bf, cu, state0 = _prepare(q, k, v, g, beta, cu_seqlens, rule, scale, initial_state, use_qk_l2norm)
    n, dev, L = qf.shape[0], qf.device, chunk_size
    chunks = [-(-(cu[s + 1] - cu[s]) // L) for s in range(len(cu) - 1)]

    def padded(x: torch.Tensor) -> torch.Tensor:  # row n is the zero padding row
        return torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))])

    qp, kp, vp, gp = (padded(x) for x in (qf, kf, vf, gf))
    bp = padded(bf) if bf is not None else None
    state = state0.clone()
    outs, rows = [], []
    offs = torch.arange(L, device=dev)
    for c in range(max(chunks, default=0)):
        active = [s for s, nc in enumerate(chunks) if nc > c]
        seg = torch.tensor(active, device=dev)
        first = torch.tensor([cu[s] + c * L for s in active], device=dev)
        end = torch.tensor([cu[s + 1] for s in active], device=dev)
        tok = first[:, None] + offs  # [A, L]
        tok = torch.where(tok < end[:, None], tok, torch.full_like(tok, n))
        o, S = _chunk_step(qp[tok], kp[tok], vp[tok], gp[tok], bp[tok] if bp is not None else None, state[seg], rule)
        state = state.index_copy(0, seg, S)
        outs.append(o.flatten(0, 1))
        rows.append(tok.flatten())
    if not outs:
        return vf.to(q.dtype), state
    o_all, row_all = torch.cat(outs), torch.cat(rows)
    real = row_all < n
    o = vf.new_zeros(vf.shape).index_copy(0, row_all[real], o_all[real])
    return o.to(q.dtype), state


def _chunk_terms(q, k, v, g, b, S=None):
    """The forward quantities of chunks (:func:`_chunk_step`'s math) that the backward reads: q, k
    [..., L, K], v [..., L, V], g, b [..., L] (b None: the gated-linear rule, whose vnew is v: no
    X, W, U), S [..., K, V] the starting states (None: not known yet; the delta rule's ``vnew``,
    the one term that needs them, is left for the caller)."""
    from types import SimpleNamespace

    L = q.shape[-2]
    dev, dt = q.device, q.dtype
    t = SimpleNamespace()
    t.lower = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    t.strict = t.lower & ~torch.eye(L, dtype=torch.bool, device=dev)
    t.G = g.cumsum(-1)
    t.D = torch.where(t.lower, (t.G[..., :, None] - t.G[..., None, :]).masked_fill(~t.lower, 0.0).exp(), 0.0)
    t.eG = t.G.exp()
    if b is None:  # gated_linear: vnew = v
        t.W = None
        t.vnew = v
    else:
        t.KK = k @ k.transpose(-1, -2)
        t.X = torch.eye(L, dtype=dt, device=dev) + torch.where(t.strict, b[..., :, None] * t.KK * t.D, 0.0)
        t.RW, t.RU = (b * t.eG)[..., None] * k, b[..., None] * v
        t.W = torch.linalg.solve_triangular(t.X, t.RW, upper=False, unitriangular=True)
        t.U = torch.linalg.solve_triangular(t.X, t.RU, upper=False, unitriangular=True)
        if S is not None:
            t.vnew = t.U - t.W @ S
    t.qe = q * t.eG[..., None]
    t.QK = q @ k.transpose(-1, -2)
    t.P = t.QK * t.D
    t.GL = t.G[..., -1]
    t.eL = (t.GL[..., None] - t.G).exp()
    t.kd = k * t.eL[..., None]
    return t


def _chunk_grads(q, k, v, g, b, S, do, dSn, t=None):
    """The backward of chunks (the math of :func:`_chunk_step`), by hand: q, k [..., L, K], v, do
    [..., L, V], g, b [..., L] (log decay, beta; b None: the gated-linear rule), S [..., K, V] the
    state each chunk starts from, dSn the gradient of the state after it, ``t`` its
    :func:`_chunk_terms` (computed if None) -> (dq, dk, dv, dg, db) (db None without b). The
    gradient of S itself is not formed: the backward's state scan gives it
    (:func:`recurrence_backward`). Padding rows (k = v = g = b = 0) get gradients nobody reads."""
    t = _chunk_terms(q, k, v, g, b, S) if t is None else t
    lower, D, eG = t.lower, t.D, t.eG
    vnew, qe, QK, P, GL, eL, kd = t.vnew, t.qe, t.QK, t.P, t.GL, t.eL, t.kd
    # S' = e^{GL} S + kd^T vnew
    dvnew = kd @ dSn
    dkd = vnew @ dSn.transpose(-1, -2)
    dk = dkd * eL[..., None]
    rk = (dkd * kd).sum(-1)
    dG = -rk
    dGL = rk.sum(-1) + (dSn * S).sum((-1, -2)) * GL.exp()
    # o = qe S + P vnew
    dqe = do @ S.transpose(-1, -2)
    dq = dqe * eG[..., None]
    dG = dG + (dqe * qe).sum(-1)
    dP = do @ vnew.transpose(-1, -2)
    dvnew = dvnew + P.transpose(-1, -2) @ do
    dQK = dP * D
    dq = dq + dQK @ k
    dk = dk + dQK.transpose(-1, -2) @ q
    dD = dP * QK
    if b is None:  # gated_linear: vnew = v
        return dq, dk, dvnew, _decay_grad(dG, dGL, dD, D, lower), None
    strict, KK, X, RW, W, U = t.strict, t.KK, t.X, t.RW, t.W, t.U
    # vnew = U - W S
    dW = -dvnew @ S.transpose(-1, -2)
    # W = X^-1 RW, U = X^-1 RU: dR = X^-T dY, dX = -(dR_W W^T + dR_U U^T)
    XT = X.transpose(-1, -2)
    dRW = torch.linalg.solve_triangular(XT, dW, upper=True, unitriangular=True)
    dRU = torch.linalg.solve_triangular(XT, dvnew, upper=True, unitriangular=True)
    dA = torch.where(strict, -(dRW @ W.transpose(-1, -2) + dRU @ U.transpose(-1, -2)), 0.0)
    dv = b[..., None] * dRU
    db = (v * dRU).sum(-1) + (eG[..., None] * k * dRW).sum(-1)
    dk = dk + (b * eG)[..., None] * dRW
    dG = dG + (RW * dRW).sum(-1)
    # A = b_i (k_i . k_j) D_ij below the diagonal
    db = db + (dA * KK * D).sum(-1)
    dKK = dA * b[..., :, None] * D
    dk = dk + dKK @ k + dKK.transpose(-1, -2) @ k
    dD = dD + dA * b[..., :, None] * KK
    return dq, dk, dv, _decay_grad(dG, dGL, dD, D, lower), db


def _decay_grad(dG, dGL, dD, D, lower):
    """dg from the gradients of G = cumsum(g) (``dG``, and ``dGL`` of its last entry) and of
    D_ij = exp(G_i - G_j) on and below the diagonal (``dD``)."""
    dDD = torch.where(lower, dD * D, 0.0)
    dG = dG + dDD.sum(-1) - dDD.sum(-2)
    dG[..., -1] = dG[..., -1] + dGL
    return dG.flip(-1).cumsum(-1).flip(-1)  # G = cumsum(g)


#: the backward's chunk gradients run in groups of chunks whose [G, H, L, K] tensors take at most
#: this many bytes (mom-340m B8 T2048: ~800 chunks in one group; longer inputs keep the same peak)
GRAD_GROUP_BYTES = 1 << 28


def _sliced(t: Any, sl: slice) -> Any:
    """:func:`_chunk_terms`' terms of the chunks ``sl`` (the masks are shared)."""
    from types import SimpleNamespace

    return SimpleNamespace(**{k: (v if k in ("lower", "strict") or v is None else v[sl]) for k, v in vars(t).items()})


def recurrence_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor | None,
    do: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    rule: str = "gated_delta",
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    dfinal: torch.Tensor | None = None,
    scans: Any = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dq, dk, dv, dg, dbeta, dinitial_state) of the recurrence's output o and final
    state (:func:`recurrent_chunked`'s arguments, either rule) given ``do`` [N, H, V] and ``dfinal``
    [S, H, K, V] (the final state's gradient; None: the final state is not used), by hand, in three
    passes as a backward kernel splits them: (1) forward, step by step over the chunks (batched over
    the segments), keeping each chunk's starting state (from ``initial_state``, zeros if None);
    (2) the state's gradient scanned back step by step from ``dfinal`` (zeros if None), the one
    sequential piece, from every chunk's forward terms computed at once: what it reaches at the
    start of a segment is the gradient of its initial state; (3) every chunk's gradients at once
    (:func:`_chunk_grads`). The L2 normalisation of q and k goes through autograd (elementwise). In
    float32 (float64 for float64 inputs), gradients in the inputs' dtypes. dbeta is None for
    "gated_linear" (no beta), dinitial_state None unless ``initial_state`` is given (in its dtype).

    ``scans``: an object with ``forward(w, u, kd, gl, state0, table, nch)`` and ``backward(w, kd,
    qe, p, do, gl, table, nch)`` that run (1) and (2) over chunk-major terms (momtune's Triton
    scans, :mod:`momtune.kernels.recurrence.scan`, which documents the layout; w is None for
    "gated_linear"; with an initial state or ``dfinal`` the backward is also passed ``dfinal=``
    and ``initial=True`` and returns (dS, dinitial_state)); None: the PyTorch steps here. If it
    also has ``chunk_backward(q, k, v, g, beta, do, cu, chunk_size)`` (q, k as the recurrence reads
    them, cu a list, beta None for "gated_linear"; returns the gradients of q, k, v, g, beta (None
    without beta), and, passed ``initial_state=`` (and ``dfinal=``), that of the initial state
    sixth), that runs (1) to (3) instead (:mod:`momtune.kernels.recurrence.chunk_bwd`); if it has
    ``normalised_backward(q, k, v, g, beta, do, cu, chunk_size, scale)`` (the raw q, k; the same
    returns in the inputs' dtypes), that does all of it, the L2 normalisation of q and k and its
    gradient included, instead of autograd (``use_qk_l2norm``). The extra keywords are passed only
    when an initial state or ``dfinal`` is given: the zero-state call is unchanged."""
    delta = rule == "gated_delta"
    extra = {} if initial_state is None and dfinal is None else dict(initial_state=initial_state, dfinal=dfinal)
    fused = getattr(scans, "chunk_backward", None)  # reads v, g, beta as given: no float copies of them
    whole = getattr(scans, "normalised_backward", None) if use_qk_l2norm else None
    if whole is not None:  # the normalisation and its gradient by ``scans`` too: no autograd
        *_, cu, _ = _prepare(q, k, v, g, beta, cu_seqlens, rule, scale, initial_state, use_qk_l2norm, values=False,
                             qk=False)
        _check_grads(do, dfinal, q, v, len(cu) - 1)
        got = whole(q, k, v, g, beta if delta else None, do, cu, chunk_size,
                    q.shape[-1] ** -0.5 if scale is None else float(scale), **extra)
        return _with_state_grad(got, initial_state)
    qk = [t.detach().requires_grad_(True) for t in (q, k)]
    with torch.enable_grad():
        qf, kf, vf, gf, bf, cu, state0 = _prepare(qk[0], qk[1], v, g, beta, cu_seqlens, rule, scale, initial_state,
                                                  use_qk_l2norm, values=fused is None)
    n, dev, L = qf.shape[0], qf.device, chunk_size
    _check_grads(do, dfinal, q, v, len(cu) - 1)
    if fused is not None:
        got = fused(qf.detach(), kf.detach(), v, g, beta if delta else None, do, cu, L, **extra)
        with torch.enable_grad():
            dq_in, dk_in = torch.autograd.grad((qf, kf), qk, got[:2])
        dv, dg, db = got[2:5]
        return _with_state_grad((dq_in.to(q.dtype), dk_in.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype),
                                 None if db is None else db.to(beta.dtype), *got[5:]), initial_state)
    cd = qf.dtype
    chunks = [-(-(cu[s + 1] - cu[s]) // L) for s in range(len(cu) - 1)]

    def padded(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.cat([x.detach(), x.new_zeros((1,) + tuple(x.shape[1:]))])

    qp, kp, vp, gp, bp = (padded(x) for x in (qf, kf, vf, gf, bf))
    dop = padded(do.to(cd))
    offs = torch.arange(L, device=dev)
    steps, toks = [], []  # per step c: (segments with a chunk c, ids of those chunks); chunk rows
    for c in range(max(chunks, default=0)):
        active = [s for s, nc in enumerate(chunks) if nc > c]
        first = torch.tensor([cu[s] + c * L for s in active], device=dev)
        end = torch.tensor([cu[s + 1] for s in active], device=dev)
        tok = first[:, None] + offs
        ids = torch.arange(len(active), device=dev) + sum(len(x) for x in toks)
        steps.append((torch.tensor(active, device=dev), ids))
        toks.append(torch.where(tok < end[:, None], tok, torch.full_like(tok, n)))
    grads = [None if x is None else torch.zeros((n + 1, *x.shape[1:]), dtype=cd, device=dev)
             for x in (qf, kf, vf, gf, bf)]
    if not toks:
        toks.append(torch.zeros(0, L, dtype=torch.long, device=dev))
    tok = torch.cat(toks)  # [C, L]: every chunk of every segment, in step order
    dlast = None if dfinal is None else dfinal.to(cd)
    with torch.no_grad():
        tr = lambda x: None if x is None else x[tok].transpose(1, 2)  # noqa: E731 - [C, L, H, *] -> [C, H, L, *]
        qc, kc, vc, gc, bc, doc = (tr(x) for x in (qp, kp, vp, gp, bp, dop))
        if scans is not None:  # (1) and (2) by ``scans`` over every chunk's S-free terms
            # table[s, c]: the id of chunk c of segment s (chunks are numbered in step order)
            table = torch.zeros((len(chunks), max(max(chunks, default=0), 1)), dtype=torch.int32, device=dev)
            for c, (seg, ids) in enumerate(steps):
                table[seg, c] = ids.to(torch.int32)
            nch = torch.tensor(chunks, dtype=torch.int32, device=dev)
            t = _chunk_terms(qc, kc, vc, gc, bc)  # the start states come from the scan: vnew below
            S0 = scans.forward(t.W, t.U if delta else vc, t.kd, t.GL, state0, table, nch)
            if delta:
                t.vnew = t.U - t.W @ S0
            if extra:
                dSn, dstate = scans.backward(t.W, t.kd, t.qe, t.P, doc, t.GL, table, nch, dfinal=dlast, initial=True)
            else:
                dSn, dstate = scans.backward(t.W, t.kd, t.qe, t.P, doc, t.GL, table, nch), None
        else:
            # 1. forward, step by step: each chunk's starting state
            S0 = state0.new_zeros((tok.shape[0], *state0.shape[1:]))
            state = state0.clone()
            for seg, ids in steps:
                S0[ids] = state[seg]
                _, S = _chunk_step(qp[tok[ids]], kp[tok[ids]], vp[tok[ids]], gp[tok[ids]],
                                   None if bp is None else bp[tok[ids]], state[seg], rule)
                state = state.index_copy(0, seg, S)
            # 2. every chunk's forward terms at once; the state's gradient scanned back step by step
            #    (the one sequential piece): dvnew = kd dS' + P^T do, dS = e^{GL} dS' + qe^T do - W^T dvnew
            #    (gated_linear: no W term)
            t = _chunk_terms(qc, kc, vc, gc, bc, S0)
            dSn = torch.zeros_like(S0)
            dstate = torch.zeros_like(state0) if dlast is None else dlast.clone()
            for seg, ids in reversed(steps):
                d = dstate[seg]
                dSn[ids] = d
                dS = t.GL[ids].exp()[..., None, None] * d + t.qe[ids].transpose(-1, -2) @ doc[ids]
                if delta:
                    dvnew = t.kd[ids] @ d + t.P[ids].transpose(-1, -2) @ doc[ids]
                    dS = dS - t.W[ids].transpose(-1, -2) @ dvnew
                dstate = dstate.index_copy(0, seg, dS)
        # 3. every chunk's gradients, in groups of chunks that bound the temporaries (~30 tensors
        #    of a group's [G, H, L, K] size: at most GRAD_GROUP_BYTES each)
        per_chunk = qc.shape[1] * qc.shape[2] * max(qc.shape[3], vc.shape[3]) * qc.element_size()
        group = max(1, GRAD_GROUP_BYTES // max(1, per_chunk))
        for lo in range(0, tok.shape[0], group):
            sl = slice(lo, lo + group)
            got = _chunk_grads(qc[sl], kc[sl], vc[sl], gc[sl], None if bc is None else bc[sl], S0[sl], doc[sl],
                               dSn[sl], _sliced(t, sl))
            flat = tok[sl].flatten()
            for acc, d in zip(grads, got):
                if acc is not None:
                    acc.index_add_(0, flat, d.transpose(1, 2).flatten(0, 1))
    dqf, dkf, dv, dg, db = (None if x is None else x[:n] for x in grads)
    with torch.enable_grad():
        dq_in, dk_in = torch.autograd.grad((qf, kf), qk, (dqf, dkf))
    return (dq_in.to(q.dtype), dk_in.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype),
            None if db is None else db.to(beta.dtype),
            None if initial_state is None else dstate.to(initial_state.dtype))


def _check_grads(do: Any, dfinal: Any, q: torch.Tensor, v: torch.Tensor, s: int) -> None:
    from momtune.checks import FLOAT_DTYPES, check_tensor

    check_tensor("do", do, shape=tuple(v.shape), dtypes=FLOAT_DTYPES)
    if dfinal is not None:
        check_tensor("dfinal", dfinal, shape=(s, q.shape[1], q.shape[2], v.shape[2]), dtypes=FLOAT_DTYPES)


def _with_state_grad(got: tuple, initial_state: torch.Tensor | None) -> tuple:
    """``scans``' gradients as :func:`recurrence_backward` returns them: six, the initial state's
    last (None without one, in its dtype with one)."""
    got = tuple(got) + (None,) * (6 - len(got))
    ds0 = None if initial_state is None else got[5].to(initial_state.dtype)
    return (*got[:5], ds0)


def gated_delta_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    do: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    scans: Any = None,
    initial_state: torch.Tensor | None = None,
    dfinal: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dg, dbeta) of the gated-delta recurrence (:func:`recurrence_backward`, whose
    arguments these are), and the initial state's gradient sixth when ``initial_state`` is given."""
    got = recurrence_backward(q, k, v, g, beta, do, cu_seqlens=cu_seqlens, rule="gated_delta", scale=scale,
                              use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size, initial_state=initial_state,
                              dfinal=dfinal, scans=scans)
    return got if initial_state is not None else got[:5]


def gated_linear_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    do: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    scans: Any = None,
    initial_state: torch.Tensor | None = None,
    dfinal: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dg) of the gated-linear recurrence (S <- exp(g_t) S + k_t v_t^T, no beta;
    :func:`recurrence_backward`, whose arguments these are), and the initial state's gradient
    fifth when ``initial_state`` is given."""
    got = recurrence_backward(q, k, v, g, None, do, cu_seqlens=cu_seqlens, rule="gated_linear", scale=scale,
                              use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size, initial_state=initial_state,
                              dfinal=dfinal, scans=scans)
    return (*got[:4], got[5]) if initial_state is not None else got[:4]
