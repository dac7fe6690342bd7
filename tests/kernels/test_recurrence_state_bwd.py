"""The recurrence backward beyond the zero-state gated-delta rule (issue 14, item 1): gradients of
the segments' initial states (and from the final states' gradient), and the gated-linear rule.

- the hand-written backward (reference/recurrence.py's recurrence_backward, through
  momtune.functions._Recurrence) against torch.autograd.gradcheck in float64, on tiny ragged
  segments (an empty one, length 1, lengths not a multiple of the chunk, several chunks);
- the Triton paths (kernels/recurrence/scan.py's scans alone, chunk_bwd.py's whole chunk
  backward) in the interpreter, float32 inputs, every output poisoned with NaN, against float64
  autograd of the chunked reference recurrence; the bound: 4 x the error of the same float32
  autograd of the reference (as test_recurrence_chunk_bwd.py);
- _Recurrence on the forward kernel (chunk_recurrence) with an initial state and the final state
  used, a padding tail after the segments;
- bad input named; the new kernel variants compiled for sm_90 (venv Triton and 3.6); a GPU check
  at the model's shape in bfloat16.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from momtune.errors import InputError
from momtune.functions import _Recurrence
from momtune.kernels.recurrence.chunk_bwd import TritonBackward, chunk_backward
from momtune.kernels.recurrence.scan import TritonScans
from momtune.reference.recurrence import recurrence_backward, recurrent_chunked
from tests.helpers import TRITON36, use_triton

RULES = ("gated_delta", "gated_linear")


def _case(cu: list[int], H: int, K: int, V: int, seed: int, dtype: torch.dtype = torch.float32) -> dict:
    """Inputs on segments ``cu``: q, k, v, g in (-1, 0), beta in (0, 1), the initial states and the
    gradients of the output and of the final states."""
    gen = torch.Generator().manual_seed(seed)
    N, S = cu[-1], len(cu) - 1
    q, k = torch.randn(N, H, K, generator=gen), torch.randn(N, H, K, generator=gen)
    v, do = torch.randn(N, H, V, generator=gen), torch.randn(N, H, V, generator=gen)
    g, b = -torch.rand(N, H, generator=gen), torch.rand(N, H, generator=gen)
    s0, dfinal = torch.randn(S, H, K, V, generator=gen), torch.randn(S, H, K, V, generator=gen)
    out = dict(q=q, k=k, v=v, g=g, beta=b, do=do, initial_state=s0, dfinal=dfinal)
    return {**{n: t.to(dtype) for n, t in out.items()}, "cu_seqlens": torch.tensor(cu)}


def _autograd(case: dict, rule: str, dtype: torch.dtype, chunk: int, init: bool, final: bool) -> list:
    """(dq, dk, dv, dg, dbeta or None, dinitial_state or None) by autograd of the chunked reference."""
    names = ["q", "k", "v", "g"] + (["beta"] if rule == "gated_delta" else []) + (["initial_state"] if init else [])
    leaves = {n: case[n].to(dtype).requires_grad_(True) for n in names}
    o, fin = recurrent_chunked(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves.get("beta"),
                               cu_seqlens=case["cu_seqlens"], rule=rule, initial_state=leaves.get("initial_state"),
                               chunk_size=chunk)
    outs, grads = [o], [case["do"].to(dtype)]
    if final:
        outs.append(fin)
        grads.append(case["dfinal"].to(dtype))
    got = dict(zip(names, torch.autograd.grad(outs, list(leaves.values()), grads)))
    return [got.get(n) for n in ("q", "k", "v", "g", "beta", "initial_state")]


def _rel(x: torch.Tensor, want: torch.Tensor) -> float:
    return float((x.double() - want).norm() / want.norm())


# ------------------------------------------------------------------------------------ gradcheck

class _ByHand(torch.autograd.Function):
    """recurrent_chunked forward, recurrence_backward's PyTorch backward at ``chunk`` (so that
    gradcheck sees several chunks a segment on tiny shapes)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, cu, rule, chunk):  # noqa: ANN001, ANN205
        ctx.save_for_backward(q, k, v, g, beta, s0, cu)
        ctx.rule, ctx.chunk = rule, chunk
        return recurrent_chunked(q, k, v, g, beta, cu_seqlens=cu, rule=rule, initial_state=s0, chunk_size=chunk)

    @staticmethod
    def backward(ctx, do, dfinal):  # noqa: ANN001, ANN205
        q, k, v, g, beta, s0, cu = ctx.saved_tensors
        got = recurrence_backward(q, k, v, g, beta, do, cu_seqlens=cu, rule=ctx.rule, chunk_size=ctx.chunk,
                                  initial_state=s0, dfinal=dfinal)
        return (*got, None, None, None)


@pytest.mark.parametrize("rule", RULES)
def test_by_hand_backward_gradcheck_float64(rule: str) -> None:
    """The PyTorch chunk backward with initial states and the final states used, chunks of 4 on
    segments of 0, 1, 6 and 9 tokens (several chunks, partial last chunks), float64."""
    case = _case([0, 6, 6, 7, 16], 1, 3, 2, seed=1, dtype=torch.float64)
    delta = rule == "gated_delta"
    args = [case[n].clone().requires_grad_(True) for n in ("q", "k", "v", "g")]
    args += [case["beta"].clone().requires_grad_(True) if delta else None,
             case["initial_state"].clone().requires_grad_(True)]
    # fast mode (random projections of the Jacobian): the full one takes one backward per output
    assert torch.autograd.gradcheck(lambda *a: _ByHand.apply(*a, case["cu_seqlens"], rule, 4), args, fast_mode=True)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("final", [False, True], ids=["o", "o-and-final"])
def test_recurrence_function_gradcheck_float64(rule: str, final: bool) -> None:
    """_Recurrence itself (float64: its backward in PyTorch, chunks of 64), the forward run by the
    reference, with initial states; ragged segments of 0, 1, 5, 7 tokens."""
    case = _case([0, 5, 5, 6, 13], 1, 3, 2, seed=2, dtype=torch.float64)
    delta = rule == "gated_delta"

    def run(q, k, v, g, beta, s0):  # noqa: ANN001, ANN202
        return recurrent_chunked(q, k, v, g, beta, cu_seqlens=case["cu_seqlens"], rule=rule, initial_state=s0)

    def f(q, k, v, g, s0, beta=None):  # noqa: ANN001, ANN202
        return _Recurrence.apply(q, k, v, g, beta, case["cu_seqlens"], run, None, rule, s0, final)

    args = [case[n].clone().requires_grad_(True) for n in ("q", "k", "v", "g", "initial_state")]
    if delta:
        args.append(case["beta"].clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, args)


# ------------------------------------------------------------------------- Triton, interpreter

@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("init", "final"), [(True, True), (True, False), (False, True), (False, False)],
                         ids=["init-final", "init", "final", "zero-states"])
@pytest.mark.parametrize(("path", "layout"), [("chunk-kernels", "KV"), ("chunk-kernels", "VK"), ("scans", "KV"),
                                               ("scans", "VK")])
def test_triton_backward_with_states_matches_autograd(rule: str, init: bool, final: bool, path: str,
                                                      layout: str) -> None:
    """Segments of 13, 0, 1 and 27 tokens (chunks of 16), K 16, V 24, both rules, with and without
    initial states / the final states' gradient; the whole chunk backward (with the L2
    normalisation's kernels) or the two scans alone, in both scan layouts; outputs poisoned with NaN."""
    cu = [0, 13, 13, 14, 41]
    case = _case(cu, 2, 16, 24, seed=10 + 2 * RULES.index(rule) + init)
    want, want32 = (_autograd(case, rule, dt, 16, init, final) for dt in (torch.float64, torch.float32))
    if path == "scans":
        scans = TritonScans(dot="ieee", block_v=16, poison=True, layout=layout)
    else:
        scans = TritonBackward(dot="ieee", poison=True, block_k=16, block_v=16, fwd_block_v=16, bwd_block_v=16,
                               scan_layout=layout)
    got = recurrence_backward(*(case[n] for n in ("q", "k", "v", "g")), case["beta"] if rule == "gated_delta" else None,
                              case["do"], cu_seqlens=case["cu_seqlens"], rule=rule, chunk_size=16,
                              initial_state=case["initial_state"] if init else None,
                              dfinal=case["dfinal"] if final else None, scans=scans)
    for name, a, w, w32 in zip(("dq", "dk", "dv", "dg", "dbeta", "dinitial_state"), got, want, want32):
        if w is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32 and a.shape == w.shape and bool(torch.isfinite(a).all()), name
        err, own = _rel(a, w), _rel(w32, w)
        assert err <= 4 * max(own, torch.finfo(torch.float32).eps), (name, err, own)


@pytest.mark.parametrize("rule", RULES)
def test_recurrence_function_on_the_kernels(rule: str) -> None:
    """_Recurrence as a training step with a cache would run it: the forward kernel from initial
    states returning the final states, both outputs used, 3 padding rows after the segments (they
    get zero gradients); the backward on the chunk kernels (interpreter, poisoned)."""
    from momtune.kernels.recurrence.chunk import chunk_recurrence

    cu = [0, 20, 20, 21, 40]
    case = _case(cu, 2, 16, 16, seed=30 + RULES.index(rule))
    delta = rule == "gated_delta"
    pad = 3
    cu_t = case["cu_seqlens"].to(torch.int32)
    leaves = {n: torch.cat([case[n], case[n].new_zeros((pad, *case[n].shape[1:]))]).requires_grad_(True)
              for n in ("q", "k", "v", "g", "beta")}
    s0 = case["initial_state"].clone().requires_grad_(True)
    o_buf = torch.zeros(cu[-1] + pad, 2, 16)

    def run(q, k, v, g, beta, state):  # noqa: ANN001, ANN202
        return chunk_recurrence(q, k, v, g, beta, cu_t, rule=rule, initial_state=state, output_final_state=True,
                                out=o_buf)

    o, final = _Recurrence.apply(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"] if delta else None,
                                 cu_t, run, dict(block_k=16, block_v=16, fwd_block_v=16, bwd_block_v=16), rule, s0,
                                 True)
    do = torch.cat([case["do"], torch.randn(pad, 2, 16)])
    names = ["q", "k", "v", "g"] + (["beta"] if delta else [])
    got = torch.autograd.grad([o, final], [leaves[n] for n in names] + [s0], [do, case["dfinal"]])
    want, want32 = (_autograd(case, rule, dt, 64, True, True) for dt in (torch.float64, torch.float32))
    want, want32 = ([w for w in x if w is not None] for x in (want, want32))
    for name, a, w, w32 in zip(names + ["initial_state"], got, want, want32):
        if name != "initial_state":
            assert bool((a[cu[-1]:] == 0).all()), name
            a = a[:cu[-1]]
        err, own = _rel(a, w), _rel(w32, w)
        assert err <= 4 * max(own, torch.finfo(torch.float32).eps), (name, err, own)


def test_state_inputs_are_checked() -> None:
    case = _case([0, 5, 8], 1, 16, 16, seed=3)
    q, k, v, g, b, do = (case[n] for n in ("q", "k", "v", "g", "beta", "do"))
    s0 = case["initial_state"]
    with pytest.raises(InputError, match="initial_state: expected shape"):
        chunk_backward(q, k, v, g, b, do, [0, 5, 8], initial_state=s0[:1])
    with pytest.raises(InputError, match="initial_state: expected float32"):
        chunk_backward(q, k, v, g, b, do, [0, 5, 8], initial_state=s0.double())
    with pytest.raises(InputError, match="dfinal: expected shape"):
        chunk_backward(q, k, v, g, b, do, [0, 5, 8], dfinal=s0[:, :, :8])
    with pytest.raises(InputError, match="dfinal"):
        recurrence_backward(q, k, v, g, b, do, cu_seqlens=case["cu_seqlens"], dfinal=s0[:1])
    with pytest.raises(InputError, match="initial_state"):
        recurrence_backward(q, k, v, g, b, do, cu_seqlens=case["cu_seqlens"], initial_state=s0[:, :, :8])
    with pytest.raises(InputError, match="rule"):
        recurrence_backward(q, k, v, g, b, do, cu_seqlens=case["cu_seqlens"], rule="delta")
    with pytest.raises(InputError, match="beta: the rule 'gated_delta' needs beta"):
        _Recurrence.apply(q, k, v, g, None, case["cu_seqlens"], None, None, "gated_delta")
    with pytest.raises(InputError, match="rule"):
        _Recurrence.apply(q, k, v, g, b, case["cu_seqlens"], None, None, "linear")


# --------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["KV", "VK"])
@pytest.mark.parametrize("rule", RULES)
def test_gpu_state_backward_at_the_model_shape(rule: str, layout: str) -> None:
    """K = V = 256, chunks of 64, 6 ragged segments (one empty, one of length 1), bf16 inputs (TF32
    dots), random initial states and final states' gradient, both scan layouts: the chunk kernels against float64
    autograd of the chunked recurrence within 4 x the error of the PyTorch chunk backward on the
    same inputs with TF32 matmuls."""
    gen = torch.Generator().manual_seed(14)
    cu = [0, 300, 300, 301, 1001, 1030, 1500]
    N, S, H, K, V = cu[-1], len(cu) - 1, 2, 256, 256
    dev, dt = "cuda", torch.bfloat16
    delta = rule == "gated_delta"
    q, k = (torch.randn(N, H, K, generator=gen).to(dev, dt) for _ in range(2))
    v, do = (torch.randn(N, H, V, generator=gen).to(dev, dt) for _ in range(2))
    g = (-0.1 * torch.rand(N, H, generator=gen)).to(dev, dt)
    b = torch.rand(N, H, generator=gen).to(dev, dt) if delta else None
    s0, dfinal = (torch.randn(S, H, K, V, generator=gen).to(dev) for _ in range(2))
    cu_t = torch.tensor(cu, device=dev)
    leaves = [t.double().requires_grad_(True) for t in (q, k, v, g, s0) + ((b,) if delta else ())]
    o, fin = recurrent_chunked(*leaves[:4], leaves[5] if delta else None, cu_seqlens=cu_t, rule=rule,
                               initial_state=leaves[4], chunk_size=64)
    want = torch.autograd.grad([o, fin], leaves, [do.double(), dfinal.double()])
    want = [*want[:4], want[5] if delta else None, want[4]]
    args = (q, k, v, g, b, do)
    kw = dict(cu_seqlens=cu_t, rule=rule, chunk_size=64, initial_state=s0, dfinal=dfinal)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        own = recurrence_backward(*args, **kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    got = recurrence_backward(*args, **kw, scans=TritonBackward(dot="tf32", poison=True, scan_layout=layout))
    for name, a, w, r in zip(("dq", "dk", "dv", "dg", "dbeta", "dinitial_state"), got, want, own):
        if w is None:
            assert a is None, name
            continue
        assert bool(torch.isfinite(a).all()), name
        err, ref_err = _rel(a, w), _rel(r, w)
        assert err <= 4 * max(ref_err, torch.finfo(torch.float32).eps), (name, err, ref_err)


# ---------------------------------------------------------------------------- compile (sm_90)



@pytest.mark.parametrize("triton_dir", [None, TRITON36], ids=["triton-venv", "triton-3.6"])
@pytest.mark.parametrize("kernel", ["terms-linear", "grads-linear", "forward-scan-linear", "backward-scan-linear",
                                    "backward-scan-states"])
def test_state_and_linear_kernels_compile_for_hopper(kernel: str, triton_dir: Path | None, monkeypatch) -> None:
    """The interpreter never compiles: the gated-linear variants of the chunk kernels and scans,
    and the backward scan reading the final states' gradient and storing the initial states',
    compile for sm_90 at the model's K = V = 256, chunks of 64, with chunk_backward's defaults,
    under the H100/H200's shared memory; with the venv's Triton and with Triton 3.6 (.triton36).
    (The compile gate, momtune.aot, compiles them too: recurrence_bwd's gate_variants.)"""
    import inspect

    from momtune.kernels.recurrence.chunk_bwd import chunk_backward as launcher
    from momtune.resources import H100_SHARED_LIMIT, chunk_bwd_resources_isolated, scan_resources_isolated

    use_triton(triton_dir, monkeypatch)
    d = {n: p.default for n, p in inspect.signature(launcher).parameters.items()}
    if "scan" in kernel:
        scan = kernel.split("-")[0]
        side = "fwd" if scan == "forward" else "bwd"
        states = kernel.endswith("states")
        res = scan_resources_isolated(scan, vnew=True, block_v=d[f"{side}_block_v"], num_warps=d[f"{side}_warps"],
                                      delta=states, dfinal=states, initial=states)
    else:
        res = chunk_bwd_resources_isolated(kernel.split("-")[0], delta=False)
    assert 0 < res["shared"] <= H100_SHARED_LIMIT, res
