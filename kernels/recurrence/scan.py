"""The two sequential pieces of the gated-delta recurrence's chunk backward, as Triton kernels.

:func:`momtune.reference.recurrence.gated_delta_backward` splits the backward in three passes:
(1) every chunk's starting state S_c, a scan forward over each segment's chunks; (2) the gradient
of the state after each chunk, dS_c, a scan back; (3) every chunk's gradients at once. (3) and
the chunk-local terms both scans read are batched tensor math over all chunks; the two scans are
the sequential part, and run here, one program per (segment, head, V block) with the [K, BV] state
(or its gradient) in registers, walking the segment's chunks (H200, session 10: the PyTorch scans,
~33 small launches a chunk step, made the layer's training step 89 ms at mom-340m B8 T2048).

Chunk-major layout, every tensor contiguous, C chunks in any order (``table[s, c]`` is the id of
chunk c of segment s; ``nch[s]`` the segment's chunk count)::

    W, KD, QE [C, H, L, K]   U, DO [C, H, L, V]   P [C, H, L, L]   GL [C, H]
    S0 (out, forward) / DS (out, backward) [C, H, K, V]   state0 [S, H, K, V]

Forward scan (S from state0):  S0[c] = S;  vnew = U - W S;  S <- exp(GL) S + KD^T vnew
Backward scan (dS from zero, or from DFINAL [S, H, K, V], the final states' gradient, with
USE_DFINAL):                   DS[c] = dS; dvnew = KD dS + P^T DO;
                               dS <- exp(GL) dS + QE^T DO - W^T dvnew
                               after a segment's first chunk (STORE_D0): DS0[s] = dS, the
                               gradient of its initial state (DFINAL's, or zero, if it is empty)
(W here is :func:`_chunk_terms`' W: vnew = U - W S.) The gated-linear rule (IS_DELTA off) has no
W: vnew = U (v itself), and dS <- exp(GL) dS + QE^T DO. Optionally (VN) the forward scan also stores
every chunk's vnew and the backward scan its dvnew, [C, H, L, V] each: the chunk gradient kernels
(:mod:`.chunk_bwd`) read them instead of contracting W and KD with the states again.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from momtune.errors import InputError


@triton.jit
def _program(H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, L: tl.constexpr,
             BV: tl.constexpr, NV: tl.constexpr):
    """This program's (segment, head) index i_sh = s * H + h, its segment and head, and the
    offsets and masks of its [KP, BV] state block, chunk rows and K columns."""
    pid = tl.program_id(0)
    i_sh = (pid // NV).to(tl.int64)
    o_k = tl.arange(0, KP)
    o_v = (pid % NV) * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    return (i_sh, i_sh // H, i_sh % H, tl.arange(0, L), o_k, m_k, m_v, m_k[:, None] & m_v[None, :],
            o_k[:, None] * V + o_v[None, :], o_v)


# MAXC (the table's row length: the longest segment's chunk count) is not specialised on: its
# divisibility by 16 falls with the ragged segments, and each fall would compile the scan again
@triton.jit(do_not_specialize=["MAXC"])
def _forward_scan_kernel(w, u, kd, gl, state0, s0, vn, table, nch, MAXC, H: tl.constexpr, K: tl.constexpr,
                         V: tl.constexpr, KP: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                         DOT: tl.constexpr, VN: tl.constexpr, IS_DELTA: tl.constexpr):
    i_sh, i_s, i_h, o_l, o_k, m_k, m_v, m_state, o_state, o_v = _program(H, K, V, KP, L, BV, NV)
    S = tl.load(state0 + i_sh * K * V + o_state, mask=m_state, other=0.0).to(tl.float32)
    n_c = tl.load(nch + i_s)
    for c in range(0, n_c):
        base = tl.load(table + i_s * MAXC + c).to(tl.int64) * H + i_h
        tl.store(s0 + base * K * V + o_state, S, mask=m_state)
        if IS_DELTA:
            wb = tl.load(w + base * L * K + o_l[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
        ub = tl.load(u + base * L * V + o_l[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
        if IS_DELTA:
            vnew = ub - tl.dot(wb, S, input_precision=DOT)
        else:
            vnew = ub
        if VN:
            tl.store(vn + base * L * V + o_l[:, None] * V + o_v[None, :], vnew, mask=m_v[None, :])
        # KD^T [KP, L], loaded transposed
        kdT = tl.load(kd + base * L * K + o_l[None, :] * K + o_k[:, None], mask=m_k[:, None], other=0.0)
        decay = tl.exp(tl.load(gl + base))
        S = S * decay + tl.dot(kdT, vnew, input_precision=DOT)


@triton.jit(do_not_specialize=["MAXC"])
def _backward_scan_kernel(w, kd, qe, p, do, gl, ds, vn, table, nch, MAXC, dfinal, ds0, H: tl.constexpr,
                          K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                          NV: tl.constexpr, DOT: tl.constexpr, VN: tl.constexpr, IS_DELTA: tl.constexpr,
                          USE_DFINAL: tl.constexpr, STORE_D0: tl.constexpr):
    i_sh, i_s, i_h, o_l, o_k, m_k, m_v, m_state, o_state, o_v = _program(H, K, V, KP, L, BV, NV)
    if USE_DFINAL:
        dS = tl.load(dfinal + i_sh * K * V + o_state, mask=m_state, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([KP, BV], dtype=tl.float32)
    n_c = tl.load(nch + i_s)
    for j in range(0, n_c):
        base = tl.load(table + i_s * MAXC + (n_c - 1 - j)).to(tl.int64) * H + i_h
        tl.store(ds + base * K * V + o_state, dS, mask=m_state)
        kdb = tl.load(kd + base * L * K + o_l[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
        pT = tl.load(p + base * L * L + o_l[None, :] * L + o_l[:, None])  # P^T [L, L]
        dob = tl.load(do + base * L * V + o_l[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
        dvnew = tl.dot(kdb, dS, input_precision=DOT)
        dvnew = tl.dot(pT, dob, dvnew, input_precision=DOT)
        if VN:
            tl.store(vn + base * L * V + o_l[:, None] * V + o_v[None, :], dvnew, mask=m_v[None, :])
        qeT = tl.load(qe + base * L * K + o_l[None, :] * K + o_k[:, None], mask=m_k[:, None], other=0.0)
        if IS_DELTA:
            wT = tl.load(w + base * L * K + o_l[None, :] * K + o_k[:, None], mask=m_k[:, None], other=0.0)
        decay = tl.exp(tl.load(gl + base))
        if IS_DELTA:
            dS = dS * decay + tl.dot(qeT, dob, input_precision=DOT) - tl.dot(wT, dvnew, input_precision=DOT)
        else:
            dS = dS * decay + tl.dot(qeT, dob, input_precision=DOT)
    if STORE_D0:
        tl.store(ds0 + i_sh * K * V + o_state, dS, mask=m_state)


@triton.jit
def _state_t(V: tl.constexpr, o_k, m_k, m_v, o_v):
    """Offsets and mask of a [BV, KP] block S^T of a [K, V] state: the VK scans hold the state
    transposed (the layout of the forward's v6 pass, ``STATE_LAYOUT="VK"``)."""
    return o_v[:, None] + o_k[None, :] * V, m_v[:, None] & m_k[None, :]


# The VK scans: the same recurrences with every product transposed, so that the state (and vnew,
# dvnew) is the left-hand operand of each dot, which sm_90's wgmma takes from registers; in the
# KV scans above it is the right-hand operand, staged through shared memory every chunk (the
# forward pass gained 1.15-1.19x from this layout, session 11). Same tensors and layouts in memory.
#   forward:  vnew^T = U^T - S^T W^T;   S^T <- exp(GL) S^T + vnew^T KD
#   backward: dvnew^T = dS^T KD^T + DO^T P;   dS^T <- exp(GL) dS^T + DO^T QE - dvnew^T W
@triton.jit(do_not_specialize=["MAXC"])
def _forward_scan_vk_kernel(w, u, kd, gl, state0, s0, vn, table, nch, MAXC, H: tl.constexpr, K: tl.constexpr,
                            V: tl.constexpr, KP: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                            NV: tl.constexpr, DOT: tl.constexpr, VN: tl.constexpr, IS_DELTA: tl.constexpr):
    i_sh, i_s, i_h, o_l, o_k, m_k, m_v, _, _, o_v = _program(H, K, V, KP, L, BV, NV)
    o_t, m_t = _state_t(V, o_k, m_k, m_v, o_v)
    ST = tl.load(state0 + i_sh * K * V + o_t, mask=m_t, other=0.0).to(tl.float32)
    n_c = tl.load(nch + i_s)
    for c in range(0, n_c):
        base = tl.load(table + i_s * MAXC + c).to(tl.int64) * H + i_h
        tl.store(s0 + base * K * V + o_t, ST, mask=m_t)
        o_lv = base * L * V + o_l[None, :] * V + o_v[:, None]  # a [BV, L] block of a [L, V] term, transposed
        vnT = tl.load(u + o_lv, mask=m_v[:, None], other=0.0)
        if IS_DELTA:
            wT = tl.load(w + base * L * K + o_l[None, :] * K + o_k[:, None], mask=m_k[:, None], other=0.0)
            vnT = vnT - tl.dot(ST, wT, input_precision=DOT)
        if VN:
            tl.store(vn + o_lv, vnT, mask=m_v[:, None])
        kdb = tl.load(kd + base * L * K + o_l[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
        ST = ST * tl.exp(tl.load(gl + base)) + tl.dot(vnT, kdb, input_precision=DOT)


@triton.jit(do_not_specialize=["MAXC"])
def _backward_scan_vk_kernel(w, kd, qe, p, do, gl, ds, vn, table, nch, MAXC, dfinal, ds0, H: tl.constexpr,
                             K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                             NV: tl.constexpr, DOT: tl.constexpr, VN: tl.constexpr, IS_DELTA: tl.constexpr,
                             USE_DFINAL: tl.constexpr, STORE_D0: tl.constexpr):
    i_sh, i_s, i_h, o_l, o_k, m_k, m_v, _, _, o_v = _program(H, K, V, KP, L, BV, NV)
    o_t, m_t = _state_t(V, o_k, m_k, m_v, o_v)
    if USE_DFINAL:
        dST = tl.load(dfinal + i_sh * K * V + o_t, mask=m_t, other=0.0).to(tl.float32)
    else:
        dST = tl.zeros([BV, KP], dtype=tl.float32)
    n_c = tl.load(nch + i_s)
    for j in range(0, n_c):
        base = tl.load(table + i_s * MAXC + (n_c - 1 - j)).to(tl.int64) * H + i_h
        tl.store(ds + base * K * V + o_t, dST, mask=m_t)
        o_lv = base * L * V + o_l[None, :] * V + o_v[:, None]
        kdT = tl.load(kd + base * L * K + o_l[None, :] * K + o_k[:, None], mask=m_k[:, None], other=0.0)
        pb = tl.load(p + base * L * L + o_l[:, None] * L + o_l[None, :])
        doT = tl.load(do + o_lv, mask=m_v[:, None], other=0.0)
        dvT = tl.dot(dST, kdT, input_precision=DOT)
        dvT = tl.dot(doT, pb, dvT, input_precision=DOT)
        if VN:
            tl.store(vn + o_lv, dvT, mask=m_v[:, None])
        o_lk = base * L * K + o_l[:, None] * K + o_k[None, :]
        qeb = tl.load(qe + o_lk, mask=m_k[None, :], other=0.0)
        dST = dST * tl.exp(tl.load(gl + base)) + tl.dot(doT, qeb, input_precision=DOT)
        if IS_DELTA:
            wb = tl.load(w + o_lk, mask=m_k[None, :], other=0.0)
            dST = dST - tl.dot(dvT, wb, input_precision=DOT)
    if STORE_D0:
        tl.store(ds0 + i_sh * K * V + o_t, dST, mask=m_t)


def _checked(name: str, x: torch.Tensor, shape: tuple[int, ...], device: torch.device,
             dtypes: tuple[torch.dtype, ...] = (torch.float32,),
             accepted: str = "float32 (the backward's chunk terms)") -> torch.Tensor:
    """``x`` contiguous, or an InputError naming ``name`` unless it has ``shape``, one of ``dtypes``
    (``accepted`` says which) and ``device``."""
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{name}: expected shape {shape}, got {got}")
    if x.dtype not in dtypes:
        raise InputError(f"{name}: expected {accepted}, got {x.dtype}")
    if x.device != device:
        raise InputError(f"{name}: on device {x.device}, expected {device}")
    return x.contiguous()


def constants(h: int, kd: int, vd: int, L: int, block_v: int, dot: str, vnew: bool = False,
              delta: bool = True) -> dict[str, object]:
    """Both scans' compile-time constants (K padded to a power of two, the V block clamped to V;
    VN: also store vnew / dvnew, which the chunk gradient kernels read; IS_DELTA off: the
    gated-linear rule, no W). The backward scan takes two more, :func:`state_constants`."""
    bv = min(block_v, max(16, triton.next_power_of_2(vd)))
    return dict(H=h, K=kd, V=vd, KP=max(16, triton.next_power_of_2(kd)), L=L, BV=bv, NV=triton.cdiv(vd, bv), DOT=dot,
                VN=vnew, IS_DELTA=delta)


def state_constants(dfinal: bool = False, initial: bool = False) -> dict[str, object]:
    """The backward scan's own compile-time constants: USE_DFINAL (start from the final states'
    gradient) and STORE_D0 (store the initial states' gradient); both off cost nothing."""
    return dict(USE_DFINAL=dfinal, STORE_D0=initial)


def _checked_tables(table: torch.Tensor, nch: torch.Tensor) -> None:
    if table.dtype != torch.int32 or table.dim() != 2 or nch.dtype != torch.int32 or nch.shape != (table.shape[0],):
        raise InputError(f"table, nch: expected int32 [S, MAXC] and [S], got {table.dtype} {tuple(table.shape)} "
                         f"and {nch.dtype} {tuple(nch.shape)}")


#: the scans' state layouts: "KV" holds the [K, BV] state, "VK" its transpose (see the VK kernels)
LAYOUTS = ("KV", "VK")


def _layout_kernel(layout: str, kv: Any, vk: Any) -> Any:
    if layout not in LAYOUTS:
        raise InputError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    return vk if layout == "VK" else kv


def forward_scan(w: torch.Tensor | None, u: torch.Tensor, kd: torch.Tensor, gl: torch.Tensor, state0: torch.Tensor,
                 table: torch.Tensor, nch: torch.Tensor, *, block_v: int = 32, num_warps: int = 4,
                 dot: str = "tf32", out: torch.Tensor | None = None, vnew: torch.Tensor | None = None,
                 layout: str = "KV") -> torch.Tensor:
    """Every chunk's starting state S0 [C, H, K, V] (float32) from the chunk terms (module doc) and
    the segments' initial states ``state0`` [S, H, K, V] (float32); into ``out`` when given; with
    ``vnew`` [C, H, L, V] (float32) also every chunk's vnew = U - W S0 into it. ``w`` None: the
    gated-linear rule (vnew = U, which holds v). ``layout``: "KV" (the state [K, BV] in registers)
    or "VK" (held transposed: the state is the left-hand operand of every dot); the same results."""
    c, h, L, kd_ = kd.shape
    vd = u.shape[-1]
    dev = kd.device
    kd = _checked("kd", kd, (c, h, L, kd_), dev)
    if w is not None:
        w = _checked("w", w, (c, h, L, kd_), dev)
    u = _checked("u", u, (c, h, L, vd), dev)
    gl = _checked("gl", gl, (c, h), dev)
    state0 = _checked("state0", state0, (table.shape[0], h, kd_, vd), dev)
    _checked_tables(table, nch)
    kernel = _layout_kernel(layout, _forward_scan_kernel, _forward_scan_vk_kernel)
    const = constants(h, kd_, vd, L, block_v, dot, vnew is not None, w is not None)
    vn = None if vnew is None else _checked("vnew", vnew, (c, h, L, vd), dev)
    s0 = torch.empty((c, h, kd_, vd), dtype=torch.float32, device=dev) if out is None else \
        _checked("out", out, (c, h, kd_, vd), dev)
    programs = table.shape[0] * h * const["NV"]
    if programs and c:
        kernel[(programs,)](kd if w is None else w, u, kd, gl, state0, s0, s0 if vn is None else vn,
                            table.contiguous(), nch, table.shape[1], **const, num_warps=num_warps, num_stages=1)
    return s0


def backward_scan(w: torch.Tensor | None, kd: torch.Tensor, qe: torch.Tensor, p: torch.Tensor, do: torch.Tensor,
                  gl: torch.Tensor, table: torch.Tensor, nch: torch.Tensor, *, block_v: int = 32,
                  num_warps: int = 4, dot: str = "tf32", out: torch.Tensor | None = None,
                  dvnew: torch.Tensor | None = None, dfinal: torch.Tensor | None = None,
                  initial: bool = False, out_initial: torch.Tensor | None = None, layout: str = "KV") -> Any:
    """The gradient of the state after every chunk, dS [C, H, K, V] (float32; after each segment's
    last chunk: ``dfinal`` [S, H, K, V] (float32), the final states' gradient, or zero), from the
    chunk terms and the output's gradient (module doc); into ``out`` when given; with ``dvnew``
    [C, H, L, V] (float32) also every chunk's dvnew = KD dS + P^T DO into it. ``w`` None: the
    gated-linear rule. ``initial``: returns (dS, dS0), dS0 [S, H, K, V] float32 the gradient of
    every segment's initial state (into ``out_initial`` when given). ``layout``: as :func:`forward_scan`'s."""
    c, h, L, kd_ = kd.shape
    vd = do.shape[-1]
    dev = kd.device
    kd, qe = (_checked(n, x, (c, h, L, kd_), dev) for n, x in (("kd", kd), ("qe", qe)))
    if w is not None:
        w = _checked("w", w, (c, h, L, kd_), dev)
    p = _checked("p", p, (c, h, L, L), dev)
    do = _checked("do", do, (c, h, L, vd), dev)
    gl = _checked("gl", gl, (c, h), dev)
    _checked_tables(table, nch)
    kernel = _layout_kernel(layout, _backward_scan_kernel, _backward_scan_vk_kernel)
    n_seg = table.shape[0]
    if dfinal is not None:
        dfinal = _checked("dfinal", dfinal, (n_seg, h, kd_, vd), dev)
    const = constants(h, kd_, vd, L, block_v, dot, dvnew is not None, w is not None)
    const.update(state_constants(dfinal is not None, initial))
    dvn = None if dvnew is None else _checked("dvnew", dvnew, (c, h, L, vd), dev)
    ds = torch.empty((c, h, kd_, vd), dtype=torch.float32, device=dev) if out is None else \
        _checked("out", out, (c, h, kd_, vd), dev)
    ds0 = None
    if initial:
        ds0 = torch.empty((n_seg, h, kd_, vd), dtype=torch.float32, device=dev) if out_initial is None else \
            _checked("out_initial", out_initial, (n_seg, h, kd_, vd), dev)
    programs = n_seg * h * const["NV"]
    if programs and c:
        kernel[(programs,)](kd if w is None else w, kd, qe, p, do, gl, ds, ds if dvn is None else dvn,
                            table.contiguous(), nch, table.shape[1], ds if dfinal is None else dfinal,
                            ds if ds0 is None else ds0, **const, num_warps=num_warps, num_stages=1)
    elif ds0 is not None:  # no chunks: every initial state reaches the end unchanged
        ds0.copy_(dfinal) if dfinal is not None else ds0.zero_()
    return (ds, ds0) if initial else ds


class TritonScans:
    """The ``scans`` of :func:`momtune.reference.recurrence.recurrence_backward`: both on these
    kernels (either rule, initial states and the final states' gradient too, in the state
    ``layout`` "KV" or "VK"). ``dot``: the float32 dots' precision ("tf32" or "ieee"; the interpreter's are exact);
    ``poison``: outputs filled with NaN before the kernels run (tests: every chunk must be written)."""

    def __init__(self, dot: str = "tf32", block_v: int = 32, num_warps: int = 4, poison: bool = False,
                 layout: str = "KV") -> None:
        if dot not in ("tf32", "ieee"):
            raise InputError(f"dot: expected 'tf32' or 'ieee', got {dot!r}")
        _layout_kernel(layout, None, None)  # an unknown layout is an error here, not at the first launch
        self.dot, self.block_v, self.num_warps, self.poison = dot, block_v, num_warps, poison
        self.layout = layout

    def _out(self, like: torch.Tensor, vd: int) -> torch.Tensor | None:
        if not self.poison:
            return None
        c, h, _, kd = like.shape
        return torch.full((c, h, kd, vd), float("nan"), dtype=torch.float32, device=like.device)

    def forward(self, w, u, kd, gl, state0, table, nch):  # noqa: ANN001, ANN201 - recurrence_backward's protocol
        return forward_scan(w, u, kd, gl, state0, table, nch, block_v=self.block_v, num_warps=self.num_warps,
                            dot=self.dot, out=self._out(kd, u.shape[-1]), layout=self.layout)

    def backward(self, w, kd, qe, p, do, gl, table, nch, dfinal=None, initial=False):  # noqa: ANN001, ANN201
        out_initial = None
        if initial and self.poison:
            out_initial = torch.full((table.shape[0], *kd.shape[1:2], kd.shape[-1], do.shape[-1]), float("nan"),
                                     dtype=torch.float32, device=kd.device)
        return backward_scan(w, kd, qe, p, do, gl, table, nch, block_v=self.block_v, num_warps=self.num_warps,
                             dot=self.dot, out=self._out(kd, do.shape[-1]), dfinal=dfinal, initial=initial,
                             out_initial=out_initial, layout=self.layout)
