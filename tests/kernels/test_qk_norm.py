"""The L2 normalisation kernels of the recurrence's backward (kernels/recurrence/qk_norm.py)
against the reference's l2norm in float64, with tolerances from the reference's own error: the
same formula through PyTorch autograd in float32 (what the backward did before these kernels),
rounded to the kernel's output dtype, against float64."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from momtune.errors import InputError
from momtune.kernels.recurrence.qk_norm import L2_EPS, l2norm_rows, l2norm_rows_backward
from momtune.reference.recurrence import L2_EPS as REF_EPS
from momtune.reference.recurrence import l2norm
from tests.helpers import TRITON36, use_triton

F32 = torch.finfo(torch.float32).eps


def _ref(x: torch.Tensor, dy: torch.Tensor, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, dx) of scale * l2norm(x) through autograd in ``dtype`` (float32 or float64)."""
    xr = x.detach().to(dtype).clone().requires_grad_(True)
    y = l2norm(xr) * scale
    (dx,) = torch.autograd.grad(y, xr, dy.to(dtype))
    return y.detach(), dx


def _rel(a: torch.Tensor, w: torch.Tensor) -> float:
    return float((a.double() - w.double()).norm() / w.double().norm().clamp_min(1e-300))


def _elem(a: torch.Tensor, w: torch.Tensor) -> float:
    return float(((a.double() - w.double()).abs() / w.double().abs().max().clamp_min(1e-300)).max())


def test_eps_is_the_references() -> None:
    assert L2_EPS == REF_EPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("shape", "scale"), [((37, 3, 256), 256 ** -0.5), ((5, 100), 1.0), ((1, 1, 16), 0.3),
                                              ((19, 2, 48), 1.0)])
def test_l2norm_rows_both_ways_match_float64(shape: tuple[int, ...], scale: float, dtype: torch.dtype) -> None:
    """Ragged row counts (not multiples of the kernel's 16-row blocks) and K not a power of two:
    y (float32) and dx (x's dtype) within 4x the float32 autograd's own error (after rounding
    to the output dtype) of float64, norm-wise and element-wise; one row of zeros (y = 0, dx =
    dy scale / sqrt(eps)); r is 1 / sqrt(sum(x^2) + eps)."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    x.view(-1, shape[-1])[0] = 0
    dy = torch.randn(shape, generator=gen)
    y, r = l2norm_rows(x, scale)
    dx = l2norm_rows_backward(x, r, dy, scale)
    y64, dx64 = _ref(x, dy, scale, torch.float64)
    y32, dx32 = _ref(x, dy, scale, torch.float32)
    assert y.dtype == torch.float32 and y.shape == x.shape and dx.dtype == dtype and dx.shape == x.shape
    assert r.shape == x.shape[:-1] and r.dtype == torch.float32
    want_r = torch.rsqrt((x.double() ** 2).sum(-1) + L2_EPS)
    assert _rel(r, want_r) <= 4 * F32
    for got, own, want in ((y, y32, y64), (dx, dx32.to(dtype), dx64)):
        assert bool(torch.isfinite(got).all())
        assert _rel(got, want) <= 4 * max(_rel(own, want), F32), (_rel(got, want), _rel(own, want))
        assert _elem(got, want) <= 4 * max(_elem(own, want), F32), (_elem(got, want), _elem(own, want))


def test_l2norm_rows_inputs_are_checked() -> None:
    x = torch.randn(4, 8)
    y, r = l2norm_rows(x)
    with pytest.raises(InputError, match="dy: expected x's shape"):
        l2norm_rows_backward(x, r, torch.randn(4, 7))
    with pytest.raises(InputError, match="r: expected float32"):
        l2norm_rows_backward(x, r.double(), torch.randn(4, 8))
    with pytest.raises(InputError, match="r: expected float32"):
        l2norm_rows_backward(x, r[:3], torch.randn(4, 8))
    with pytest.raises(InputError, match="x: expected a floating-point tensor"):
        l2norm_rows(torch.arange(8).view(2, 4))


def test_fused_backward_uses_the_kernels_and_matches_autograd(monkeypatch) -> None:
    """gated_delta_backward with TritonBackward normalises q, k with these kernels (counted) and
    its gradients agree with the same backward through autograd's normalisation (TritonBackward
    without l2norm) to float32 rounding."""
    from momtune.kernels.recurrence import chunk_bwd, qk_norm
    from momtune.reference.recurrence import gated_delta_backward

    calls = []
    for name in ("l2norm_rows", "l2norm_rows_backward"):
        fn = getattr(qk_norm, name)
        monkeypatch.setattr(qk_norm, name, lambda *a, _f=fn, _n=name, **kw: (calls.append(_n), _f(*a, **kw))[1])

    class Autograd(chunk_bwd.TritonBackward):
        normalised_backward = None

    gen = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 21, 40])
    N, H, K = 40, 2, 16
    q, k, v, do = (torch.randn(N, H, K, generator=gen) for _ in range(4))
    g = -0.1 * torch.rand(N, H, generator=gen)
    b = torch.rand(N, H, generator=gen)
    got = gated_delta_backward(q, k, v, g, b, do, cu_seqlens=cu, chunk_size=16,
                               scans=chunk_bwd.TritonBackward(dot="ieee", block_k=16, block_v=16, fwd_block_v=16))
    assert calls == ["l2norm_rows", "l2norm_rows", "l2norm_rows_backward", "l2norm_rows_backward"]
    want = gated_delta_backward(q, k, v, g, b, do, cu_seqlens=cu, chunk_size=16,
                                scans=Autograd(dot="ieee", block_k=16, block_v=16, fwd_block_v=16))
    assert len(calls) == 4
    for name, a, w in zip(("dq", "dk", "dv", "dg", "dbeta"), got, want):
        assert _rel(a, w) <= 64 * F32, (name, _rel(a, w))




@pytest.mark.parametrize("triton_dir", [None, TRITON36], ids=["triton-venv", "triton-3.6"])
@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_qk_norm_kernels_compile_for_hopper(kernel: str, triton_dir: Path | None, monkeypatch) -> None:
    """Both kernels compile for sm_90 (bf16 x, K = 256, the launcher's blocks and warps) with the
    venv's Triton and the GPU machine's (3.6, .triton36), without spills."""
    from momtune.resources import qk_norm_resources_isolated

    use_triton(triton_dir, monkeypatch)
    res = qk_norm_resources_isolated(kernel, registers=True)
    assert res["n_spills"] == 0 and res["n_regs"] <= 255, res


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_l2norm_rows_at_the_model_shape(dtype: torch.dtype) -> None:
    """On the GPU at mom-340m B 8 T 2048's recurrence rows (N 49152, H 4, K 256): outputs
    poisoned first (NaN), then both kernels against float64 within 4x the float32 autograd's
    own error."""
    x = (3 * torch.randn(49152, 4, 256, device="cuda")).to(dtype)
    dy = torch.randn(49152, 4, 256, device="cuda")
    scale = 256 ** -0.5
    for fn in (lambda: l2norm_rows(x, scale), lambda: l2norm_rows_backward(x, r, dy, scale)):
        # poison: NaN in the memory the caching allocator hands the outputs next
        junk = torch.full((2 * x.numel(),), float("nan"), device="cuda")
        del junk
        out = fn()
        if isinstance(out, tuple):
            y, r = out
        else:
            dx = out
    y64, dx64 = _ref(x, dy, scale, torch.float64)
    y32, dx32 = _ref(x, dy, scale, torch.float32)
    for got, own, want in ((y, y32, y64), (dx, dx32.to(dtype), dx64)):
        assert bool(torch.isfinite(got).all())
        assert _rel(got, want) <= 4 * max(_rel(own, want), F32), (_rel(got, want), _rel(own, want))
