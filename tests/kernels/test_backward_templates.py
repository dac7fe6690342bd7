"""The backward templates norm_bwd, swiglu_bwd, merge_bwd, routing_bwd and conv_bwd (issue 14) and the autograd functions over them
(momtune.functions): every output is checked with the tuner's gate, i.e. against float64 autograd
of the forward's reference with bounds derived from that reference run in float32 on the same
inputs (FACTOR x its own error, momtune.gate), outputs poisoned with NaN first, on ragged and
strided shapes; gradcheck does not apply (the kernels compute in float32 by design)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from momtune.errors import ConfigError, InputError
from momtune.functions import add_rms_norm_train, swiglu_train
from momtune.gate import FACTOR, bounds_for, check
from momtune.kernels import get_template
from momtune.kernels.norm.backward import rms_norm_backward
from momtune.kernels.swiglu.backward import swiglu_backward
from momtune.reference.norm import rms_norm
from tests.helpers import poison
from tests.kernels.test_routing import check_space, gpu_shapes, load_space

INTERP_DTYPES = [torch.float32, torch.float16]  # the interpreter's bf16 dots are wrong; these kernels have no dots,
# but the GPU run covers bf16 at the real shapes


def gate(name: str, inputs: dict, got: dict, dtype: torch.dtype, device: str) -> None:
    t = get_template(name)
    ref = t.reference(inputs)
    verdict = check(got, ref, bounds_for(t, inputs, ref, got, dtype, device))
    assert verdict.ok, verdict.reason


def run(name: str, shape: dict, dtype: torch.dtype, device: str, config: dict | None = None, seed: int = 0) -> None:
    t = get_template(name)
    inputs = t.make_inputs(shape, dtype, device, seed)
    first = t.launch(inputs, config or t.default_config)
    out = {k: poison(torch.empty_like(v)) for k, v in first.items()}
    got = t.launch(inputs, config or t.default_config, out=out)
    for k in got:
        assert got[k] is out[k], f"{name}: {k} not written into out"
    gate(name, inputs, got, dtype, device)


NORM_CASES = [  # (N, D, residual, config)
    (13, 24, 1, None), (5, 32, 0, None), (300, 48, 1, dict(BLOCK_N=1, ROWS=16, num_warps=1)),
    (1, 1000, 1, dict(BLOCK_N=2, ROWS=256, num_warps=8)), (70, 64, 0, dict(BLOCK_N=16, ROWS=16, num_warps=2)),
]


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: f"N{c[0]}-D{c[1]}-res{c[2]}-{'cfg' if c[3] else 'default'}")
def test_norm_bwd_matches_float64_autograd(case: tuple, dtype: torch.dtype) -> None:
    N, D, res, cfg = case
    run("norm_bwd", dict(N=N, D=D, residual=res), dtype, "cpu", cfg, seed=N + D)


SWIGLU_CASES = [(7, 40, None), (3, 128, None), (33, 130, dict(BLOCK_N=2, BLOCK_I=32, num_warps=1)),
                (1, 5000, dict(BLOCK_N=1, BLOCK_I=2048, num_warps=8))]


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", SWIGLU_CASES, ids=lambda c: f"N{c[0]}-I{c[1]}-{'cfg' if c[2] else 'default'}")
def test_swiglu_bwd_matches_float64_autograd(case: tuple, dtype: torch.dtype) -> None:
    N, I, cfg = case
    run("swiglu_bwd", dict(N=N, I=I), dtype, "cpu", cfg, seed=N + I)


MERGE_CASES = [  # (B, T, H, V, J, fused_norm, config)
    (2, 13, 2, 16, 3, 1, None), (1, 5, 3, 24, 2, 0, None), (3, 7, 2, 24, 3, 1, dict(BLOCK_T=1, num_warps=1)),
    (1, 40, 1, 32, 1, 1, dict(BLOCK_T=32, num_warps=2)),
]


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: f"B{c[0]}-T{c[1]}-H{c[2]}-V{c[3]}-J{c[4]}-fused{c[5]}-"
                         f"{'cfg' if c[6] else 'default'}")
def test_merge_bwd_matches_float64_autograd(case: tuple, dtype: torch.dtype) -> None:
    B, T, H, V, J, fused, cfg = case
    run("merge_bwd", dict(B=B, T=T, H=H, V=V, J=J, fused_norm=fused), dtype, "cpu", cfg, seed=B * T + V)


ROUTING_CASES = [  # (B, T, E, topk, shared, config)
    (2, 13, 4, 2, 1, None), (1, 1, 4, 4, 0, None), (5, 40, 8, 4, 0, dict(BLOCK_T=16, num_warps=1)),
    (2, 9, 6, 3, 1, dict(BLOCK_T=512, num_warps=8)),
]


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ROUTING_CASES, ids=lambda c: f"B{c[0]}-T{c[1]}-E{c[2]}-k{c[3]}-sh{c[4]}-"
                         f"{'cfg' if c[5] else 'default'}")
def test_routing_bwd_matches_float64_autograd(case: tuple, dtype: torch.dtype) -> None:
    B, T, E, k, sh, cfg = case
    run("routing_bwd", dict(B=B, T=T, E=E, topk=k, shared=sh, D=16), dtype, "cpu", cfg, seed=B * T + E)


CONV_CASES = [  # (B, T, E, topk, shared, C, config)
    (2, 13, 4, 2, 1, 24, None), (1, 5, 3, 3, 0, 32, None), (3, 40, 4, 1, 1, 130, dict(BLOCK_N=8, BLOCK_C=32, num_warps=1)),
    (1, 1, 4, 2, 1, 16, None),  # T 1: every segment one row or empty
    (2, 33, 1, 1, 0, 64, dict(BLOCK_N=64, BLOCK_C=64, num_warps=4)),  # every token routed to the one memory
]


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"B{c[0]}-T{c[1]}-E{c[2]}-k{c[3]}-sh{c[4]}-C{c[5]}-"
                         f"{'cfg' if c[6] else 'default'}")
def test_conv_bwd_matches_float64_autograd(case: tuple, dtype: torch.dtype) -> None:
    B, T, E, k, sh, C, cfg = case
    run("conv_bwd", dict(B=B, T=T, E=E, topk=k, shared=sh, C=C), dtype, "cpu", cfg, seed=B * T + C)


def _conv_case(seed: int = 5):
    t = get_template("conv_bwd")
    return t, t.make_inputs(dict(B=2, T=11, E=4, topk=2, shared=1, C=20), torch.float32, "cpu", seed)


def test_conv_bwd_a_shared_source_sums_its_rows_gradients() -> None:
    """q's source [B*T, C] is read by all J rows of a token: its gradient is the sum over them
    (against float64 autograd of the forward reference on the 2-D source)."""
    from momtune.kernels.conv.backward import segment_conv_backward
    from momtune.reference.conv import short_conv

    t, inputs = _conv_case()
    src2 = inputs["src"][:, 0].contiguous()  # one row per token
    args = (inputs["token_index"], inputs["row_mem"], inputs["row_seg"], inputs["cu_seqlens"], inputs["dy"])
    out = {"dsrc": poison(torch.empty_like(src2)), "dw": poison(torch.empty_like(inputs["weight"]))}
    dsrc, dw = segment_conv_backward(src2, inputs["weight"], *args, out=out)
    def grads(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x = src2.to(dtype).requires_grad_(True)
        w = inputs["weight"].to(dtype).requires_grad_(True)
        y, _ = short_conv(x[inputs["token_index"].long()], w, inputs["cu_seqlens"].long())
        return torch.autograd.grad(y, (x, w), inputs["dy"].to(dtype))

    (gx, gw), (fx, fw) = grads(torch.float64), grads(torch.float32)
    assert dsrc.shape == src2.shape
    for got, ref, ref32 in ((dsrc, gx, fx), (dw, gw, fw)):  # within FACTOR x the float32 reference's own error
        err, own = (float(torch.linalg.norm(v.double() - ref)) for v in (got, ref32))
        assert err <= FACTOR * own, (err, own)


def test_conv_bwd_padding_tail_rows_get_and_give_no_gradient() -> None:
    """A masked routing puts its padding rows after every segment (past cu_seqlens[-1], memory 0,
    the last segment): their dy must not reach any source row or the weight."""
    t, inputs = _conv_case()
    want = t.launch(inputs, t.default_config)
    tail = 5
    padded = dict(inputs)
    Np = inputs["token_index"].shape[0]
    padded["token_index"] = torch.cat([inputs["token_index"], torch.arange(tail, dtype=torch.int32)])
    padded["row_mem"] = torch.cat([inputs["row_mem"], torch.zeros(tail, dtype=torch.int32)])
    padded["row_seg"] = torch.cat([inputs["row_seg"], torch.full((tail,), inputs["cu_seqlens"].numel() - 2,
                                                                  dtype=torch.int32)])
    padded["dy"] = torch.cat([inputs["dy"], 100 * torch.ones(tail, inputs["dy"].shape[1])])
    assert int(padded["cu_seqlens"][-1]) == Np
    got = t.launch(padded, t.default_config)
    assert torch.equal(got["dsrc"], want["dsrc"]) and torch.equal(got["dw"], want["dw"])
    # and the memories a token did not pick get exact zeros
    picked = torch.zeros(inputs["src"].shape[:2], dtype=torch.bool)
    picked[inputs["token_index"].long(), inputs["row_mem"].long()] = True
    assert torch.count_nonzero(want["dsrc"][~picked]) == 0 and torch.count_nonzero(want["dsrc"][picked]) > 0


def test_conv_bwd_gradient_does_not_cross_segments() -> None:
    """A backward that let a row's da reach the previous segment's last rows is caught by the gate."""
    t, inputs = _conv_case()
    got = t.launch(inputs, t.default_config)
    wrong = {k: v.clone() for k, v in got.items()}
    cu = inputs["cu_seqlens"].long()
    first = [int(c) for c, n in zip(cu[:-1], cu[1:]) if n > c and c > 0]
    r = first[0]  # the first row of a later segment: add its tap into the row before it
    tok, mem = int(inputs["token_index"][r - 1]), int(inputs["row_mem"][r - 1])
    wrong["dsrc"][tok, mem] += 0.5 * inputs["dy"][r]
    with pytest.raises(AssertionError, match="dsrc"):
        gate("conv_bwd", inputs, wrong, torch.float32, "cpu")


def test_routing_bwd_zero_where_there_is_no_gradient() -> None:
    """Top-1 weights are the constant 1 and unchosen logits never matter: exact zeros there (the
    float64 autograd reference is only zero up to rounding, so the gate alone says little)."""
    t = get_template("routing_bwd")
    inputs = t.make_inputs(dict(B=3, T=40, E=3, topk=1, shared=1, D=8), torch.float32, "cpu", 2)
    assert torch.count_nonzero(t.launch(inputs, t.default_config)["dlogits"]) == 0
    inputs = t.make_inputs(dict(B=2, T=9, E=6, topk=2, shared=0, D=8), torch.float32, "cpu", 3)
    dl = t.launch(inputs, t.default_config)["dlogits"]
    chosen = torch.zeros_like(dl, dtype=torch.bool).scatter_(-1, inputs["idx"].long(), True)
    assert torch.count_nonzero(dl[~chosen]) == 0 and torch.count_nonzero(dl[chosen]) > 0
    # a token's gradients sum to zero (the softmax's shift invariance)
    assert float(dl.sum(-1).abs().max()) < 1e-6


def test_merge_bwd_writes_every_packed_row_and_the_gate_gradient_is_not_the_plain_one() -> None:
    """do_packed: each packed row once (slot is a bijection); dgate carries silu's full derivative."""
    t = get_template("merge_bwd")
    inputs = t.make_inputs(dict(B=2, T=9, H=2, V=16, J=3, fused_norm=1), torch.float32, "cpu", 4)
    got = t.launch(inputs, t.default_config)
    assert not torch.isnan(got["do_packed"]).any()
    wrong = dict(got)
    g = inputs["gate"].double()
    s = torch.sigmoid(g)
    wrong["dgate"] = (got["dgate"].double() / (s * (1 + g * (1 - s))) * s).float()  # sigmoid instead of silu'
    with pytest.raises(AssertionError, match="dgate"):
        gate("merge_bwd", inputs, wrong, torch.float32, "cpu")


def test_strided_rows_are_read_through_their_strides() -> None:
    """h, dy and dh_out as column slices of wider buffers (the LM's projections are such views)."""
    gen = torch.Generator().manual_seed(3)
    N, D = 9, 24
    wide = torch.randn(3, N, D + 8, generator=gen)
    h, dy, dho = (wide[i, :, :D] for i in range(3))
    w = 1 + 0.2 * torch.randn(D, generator=gen)
    inputs = {"h": h, "weight": w, "dy": dy, "dh_out": dho}
    dh, dw = rms_norm_backward(h, w, dy, dh_out=dho, out={"dh": poison(torch.empty(N, D)), "dw": poison(torch.empty(D))})
    gate("norm_bwd", inputs, {"dh": dh, "dw": dw}, torch.float32, "cpu")
    gu = torch.randn(N, 2 * D + 3, generator=gen)
    g, u, dyy = gu[:, :D], gu[:, D:2 * D], torch.randn(N, D + 5, generator=gen)[:, :D]
    dg, du = swiglu_backward(g, u, dyy)
    gate("swiglu_bwd", {"g": g, "u": u, "dy": dyy}, {"dg": dg, "du": du}, torch.float32, "cpu")


def test_a_wrong_derivative_fails_the_gate() -> None:
    """The gate is not lenient with these outputs: the forward's derivative without the
    (1 + g (1 - s)) factor of silu', or dw from h instead of the normalised row, is rejected."""
    t = get_template("swiglu_bwd")
    inputs = t.make_inputs({"N": 7, "I": 40}, torch.float32, "cpu", 0)
    g, u, dy = (inputs[k].double() for k in ("g", "u", "dy"))
    s = torch.sigmoid(g)
    wrong = {"dg": (dy * u * s).float(), "du": (dy * g * s).float()}
    with pytest.raises(AssertionError, match="dg"):
        gate("swiglu_bwd", inputs, wrong, torch.float32, "cpu")
    t = get_template("norm_bwd")
    inputs = t.make_inputs({"N": 13, "D": 24, "residual": 1}, torch.float32, "cpu", 0)
    got = t.launch(inputs, t.default_config)
    got["dw"] = (inputs["dy"] * inputs["h"]).sum(0)
    with pytest.raises(AssertionError, match="dw"):
        gate("norm_bwd", inputs, got, torch.float32, "cpu")


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
def test_autograd_function_gradients_of_the_norm(residual: bool) -> None:
    """add_rms_norm_train: the gradients of x, the residual and the weight against float64
    autograd (bound: 4 x the float32 reference's error, at least 2 float32 ulps), including the
    case where only h (the residual stream) is used downstream."""
    gen = torch.Generator().manual_seed(5)
    N, D = 11, 40
    x = torch.randn(N, D, generator=gen).requires_grad_(True)
    r = torch.randn(N, D, generator=gen).requires_grad_(True) if residual else None
    w = (1 + 0.2 * torch.randn(D, generator=gen)).requires_grad_(True)
    dy, dh = torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)

    def loss(x, r, w, lib: bool, use_y: bool = True):
        if lib:
            y, h = add_rms_norm_train(x, w, residual=r)
        else:
            h = x + r if r is not None else x
            y = rms_norm(h, w, 1e-6)
        return ((y * dy.to(y.dtype)).sum() if use_y else 0) + ((h * dh.to(h.dtype)).sum() if r is not None else 0)

    for use_y in ((True, False) if residual else (True,)):
        leaves = [t for t in (x, r, w) if t is not None]
        got = torch.autograd.grad(loss(x, r, w, True, use_y), leaves, allow_unused=True)
        d64 = [t.detach().double().requires_grad_(True) for t in leaves]
        d32 = [t.detach().float().requires_grad_(True) for t in leaves]
        want = torch.autograd.grad(loss(d64[0], d64[1] if residual else None, d64[-1], False, use_y), d64, allow_unused=True)
        want32 = torch.autograd.grad(loss(d32[0], d32[1] if residual else None, d32[-1], False, use_y), d32,
                                     allow_unused=True)
        for name, a, b, c in zip("xrw" if residual else "xw", got, want, want32):
            if b is None:
                assert a is None or float(a.abs().max()) == 0.0, name
                continue
            err, ref_err = float((a.double() - b).norm() / b.norm()), float((c.double() - b).norm() / b.norm())
            assert err <= max(4 * ref_err, 2 * torch.finfo(torch.float32).eps), (name, use_y, err, ref_err)


def test_autograd_function_gradients_of_swiglu() -> None:
    gen = torch.Generator().manual_seed(6)
    g = (3 * torch.randn(6, 70, generator=gen)).requires_grad_(True)
    u = torch.randn(6, 70, generator=gen).requires_grad_(True)
    dy = torch.randn(6, 70, generator=gen)
    got = torch.autograd.grad((swiglu_train(g, u) * dy).sum(), (g, u))
    g64, u64 = g.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
    want = torch.autograd.grad((F.silu(g64) * u64 * dy.double()).sum(), (g64, u64))
    g32, u32 = g.detach().clone().requires_grad_(True), u.detach().clone().requires_grad_(True)
    want32 = torch.autograd.grad((F.silu(g32) * u32 * dy).sum(), (g32, u32))
    for name, a, b, c in zip("gu", got, want, want32):
        err, ref_err = float((a.double() - b).norm() / b.norm()), float((c.double() - b).norm() / b.norm())
        assert err <= max(4 * ref_err, 2 * torch.finfo(torch.float32).eps), (name, err, ref_err)


@pytest.mark.parametrize("fn, kw, arg", [
    (rms_norm_backward, dict(dy=torch.randn(4, 8)), "dy"),
    (rms_norm_backward, dict(dh_out=torch.randn(4, 16, dtype=torch.float16)), "dh_out"),
    (rms_norm_backward, dict(weight=torch.randn(8)), "weight"),
    (rms_norm_backward, dict(eps=0.0), "eps"),
    (swiglu_backward, dict(dy=torch.randn(4, 8)), "dy"),
    (swiglu_backward, dict(u=torch.randn(16, 4).t()), "u"),
], ids=["norm-dy-shape", "norm-dh_out-dtype", "norm-weight-shape", "norm-eps", "swiglu-dy-shape", "swiglu-u-strided"])
def test_bad_inputs_name_the_argument(fn, kw: dict, arg: str) -> None:
    if fn is rms_norm_backward:
        a = dict(h=torch.randn(4, 16), weight=torch.randn(16), dy=torch.randn(4, 16), dh_out=None, eps=1e-6)
        a.update(kw)
        call = lambda: fn(a["h"], a["weight"], a["dy"], dh_out=a["dh_out"], eps=a["eps"])  # noqa: E731
    else:
        a = dict(g=torch.randn(4, 16), u=torch.randn(4, 16), dy=torch.randn(4, 16))
        a.update(kw)
        call = lambda: fn(a["g"], a["u"], a["dy"])  # noqa: E731
    with pytest.raises(InputError, match=arg):
        call()


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ConfigError, match="ROWS"):
        rms_norm_backward(torch.randn(4, 16), torch.randn(16), torch.randn(4, 16), config={"BLOCK_N": 8, "ROWS": 12})
    with pytest.raises(ConfigError, match="BLOCK_I"):
        swiglu_backward(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8), config={"BLOCK_I": 100})


@pytest.mark.parametrize("name", ["norm_bwd", "swiglu_bwd", "merge_bwd", "routing_bwd", "conv_bwd"])
def test_backward_search_spaces(name: str) -> None:
    check_space(name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, shape", [pytest.param(n, p.values[0], id=f"{n}-{p.id}")
                                         for n in ("norm_bwd", "swiglu_bwd", "merge_bwd", "routing_bwd", "conv_bwd")
                                         for p in gpu_shapes(n, ("mom-340m-prefill", "mom-1.3b-prefill"))])
def test_backward_templates_gpu_bf16(name: str, shape: dict) -> None:
    run(name, shape, torch.bfloat16, "cuda", seed=12)


def test_tiny_sets_exist() -> None:
    for name in ("norm_bwd", "swiglu_bwd", "merge_bwd", "routing_bwd", "conv_bwd"):
        assert load_space(name)["shapes"]["tiny"]["shapes"]
