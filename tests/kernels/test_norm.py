"""Fused residual add + RMSNorm kernel (kernels/norm) against momtune.reference.norm.rms_norm."""
from __future__ import annotations

import pytest
import torch

from momtune.errors import ConfigError, InputError
from momtune.kernels.norm import add_rms_norm
from momtune.reference.norm import rms_norm
from tests.helpers import assert_close, poison
from tests.kernels.test_routing import check_space, gpu_shapes, load_space, run_template

# (N, D, residual, strided rows, BLOCK_N, num_warps, dtype)
CASES = [
    (13, 24, True, False, 4, 1, torch.float32),
    (5, 32, False, True, 1, 1, torch.float32),
    (1, 40, True, True, 2, 2, torch.float32),
    (9, 64, True, False, 16, 4, torch.float16),
    (7, 33, False, False, 8, 1, torch.float16),
]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


def case_id(c: tuple) -> str:
    N, D, res, strided, bn, nw, dt = c
    return "-".join([f"N{N}", f"D{D}", "residual" if res else "plain", "strided" if strided else "contig",
                     f"BN{bn}", f"nw{nw}", str(dt).replace("torch.float", "fp")])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_add_rms_norm_matches_reference(case: tuple) -> None:
    N, D, res, strided, bn, nw, dt = case
    gen = torch.Generator().manual_seed(N * 100 + D)
    wide = poison(torch.empty(N, D + 16 if strided else D, dtype=dt))
    x = wide[:, 3:3 + D] if strided else wide
    x.copy_(torch.randn(N, D, generator=gen))
    r = (2 * torch.randn(N, D, generator=gen)).to(dt) if res else None
    w = (1 + 0.2 * torch.randn(D, generator=gen)).to(dt)
    out = {"y": poison(torch.empty(N, D, dtype=dt)), "h": poison(torch.empty(N, D, dtype=dt))}
    y, h = add_rms_norm(x, w, residual=r, eps=1e-6, config={"BLOCK_N": bn, "num_warps": nw}, out=out)
    assert y is out["y"]
    atol, rtol = TOL[dt]
    if res:
        assert h is out["h"]
        want_h = x.double() + r.double()
        assert_close("h", h, want_h, atol, rtol)
        # the norm is of h as stored (rounded to dt), as the unfused block's add-then-norm
        assert_close("y", y, rms_norm(h.double(), w.double(), 1e-6), atol, rtol)
    else:
        assert h is x and bool(torch.isnan(out["h"]).all()), "without a residual, h is x and out['h'] is untouched"
    assert_close("y(float64 ref)", y, rms_norm((x.double() + (r.double() if res else 0)), w.double(), 1e-6),
                 4 * atol if dt == torch.float16 else atol, 4 * rtol if dt == torch.float16 else rtol)


def test_equals_the_unfused_block_in_bf16_math() -> None:
    """fp32 inputs: the fused kernel equals the reference block's x + o then rms_norm to 1e-6."""
    gen = torch.Generator().manual_seed(3)
    x, o = torch.randn(6, 48, generator=gen), torch.randn(6, 48, generator=gen)
    w = 1 + 0.1 * torch.randn(48, generator=gen)
    y, h = add_rms_norm(o, w, residual=x, eps=1e-5)
    assert_close("h", h, x + o, 1e-6, 1e-6)
    assert_close("y", y, rms_norm(x + o, w, 1e-5), 1e-6, 1e-6)


def call(**kw):
    a = dict(x=torch.randn(4, 16), weight=torch.ones(16), residual=None, eps=1e-6, config=None, out=None)
    a.update(kw)
    return add_rms_norm(a.pop("x"), a.pop("weight"), **a)


@pytest.mark.parametrize("kw, arg", [
    (dict(x=torch.randn(4, 16, 2)), "x"),
    (dict(x=torch.randn(4, 16, dtype=torch.float64)), "x"),
    (dict(x=torch.randn(16, 4).t()), "x"),
    (dict(weight=torch.ones(8)), "weight"),
    (dict(residual=torch.randn(4, 8)), "residual"),
    (dict(residual=torch.randn(4, 16, dtype=torch.float16)), "residual"),
    (dict(eps=0.0), "eps"),
    (dict(out={"y": torch.empty(4, 8)}), "out.y"),
], ids=["x-rank", "x-dtype", "x-strided-cols", "weight-shape", "residual-shape", "residual-dtype", "eps", "out-shape"])
def test_bad_inputs_raise(kw: dict, arg: str) -> None:
    with pytest.raises(InputError, match=arg):
        call(**kw)


def test_bad_config_raises() -> None:
    with pytest.raises(ConfigError, match="BLOCK_N"):
        call(config={"BLOCK_N": 3})
    with pytest.raises(ConfigError, match="unknown keys"):
        call(config={"BLOCK_D": 32})


def test_norm_search_space() -> None:
    check_space("norm")
    assert "decode" in load_space("norm")["shapes"]


@pytest.mark.parametrize("shape", load_space("norm")["shapes"]["tiny"]["shapes"],
                         ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_norm_template_tiny(shape: dict) -> None:
    run_template("norm", shape, torch.float32, "cpu", seed=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", gpu_shapes("norm", ("mom-340m-prefill", "mom-1.3b-prefill", "decode")))
def test_norm_template_gpu_bf16(shape: dict) -> None:
    run_template("norm", shape, torch.bfloat16, "cuda", seed=6)
