"""SwiGLU activation kernel (kernels/swiglu) against silu(g) * u in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from momtune.errors import ConfigError, InputError
from momtune.kernels.swiglu import swiglu
from tests.helpers import assert_close, poison
from tests.kernels.test_routing import check_space, gpu_shapes, load_space, run_template

# (N, I, strided, BLOCK_N, BLOCK_I, dtype)
CASES = [
    (7, 40, False, 4, 16, torch.float32),
    (1, 33, True, 1, 64, torch.float32),
    (5, 130, True, 2, 32, torch.float16),
    (3, 8, False, 16, 128, torch.float32),
]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-I{c[1]}-{'strided' if c[2] else 'contig'}-"
                         f"BN{c[3]}-BI{c[4]}-{str(c[5]).replace('torch.float', 'fp')}")
def test_swiglu_matches_reference(case: tuple) -> None:
    N, I, strided, bn, bi, dt = case
    gen = torch.Generator().manual_seed(N * 1000 + I)
    gu = poison(torch.empty(N, 2 * I + (5 if strided else 0), dtype=dt))
    gu[:, :2 * I] = (3 * torch.randn(N, 2 * I, generator=gen)).to(dt)
    g, u = (gu[:, :I], gu[:, I:2 * I]) if strided else (gu[:, :I].contiguous(), gu[:, I:2 * I].contiguous())
    y = poison(torch.empty(N, I, dtype=dt))
    got = swiglu(g, u, config={"BLOCK_N": bn, "BLOCK_I": bi, "num_warps": 1}, out=y)
    assert got is y
    assert_close("y", y, F.silu(g.double()) * u.double(), *TOL[dt])


@pytest.mark.parametrize("kw, arg", [
    (dict(g=torch.randn(4, 16, 2)), "g"),
    (dict(u=torch.randn(4, 8)), "u"),
    (dict(u=torch.randn(4, 16, dtype=torch.float16)), "u"),
    (dict(g=torch.randn(16, 4).t(), u=torch.randn(4, 16)), "g"),
    (dict(out=torch.empty(4, 8)), "y"),
], ids=["g-rank", "u-shape", "u-dtype", "g-strided-cols", "out-shape"])
def test_bad_inputs_raise(kw: dict, arg: str) -> None:
    a = dict(g=torch.randn(4, 16), u=torch.randn(4, 16), out=None)
    a.update(kw)
    with pytest.raises(InputError, match=arg):
        swiglu(a["g"], a["u"], out=a["out"])


def test_bad_config_raises() -> None:
    with pytest.raises(ConfigError, match="BLOCK_I"):
        swiglu(torch.randn(2, 8), torch.randn(2, 8), config={"BLOCK_I": 100})


def test_swiglu_search_space() -> None:
    check_space("swiglu")
    assert "decode" in load_space("swiglu")["shapes"]


@pytest.mark.parametrize("shape", load_space("swiglu")["shapes"]["tiny"]["shapes"],
                         ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_swiglu_template_tiny(shape: dict) -> None:
    run_template("swiglu", shape, torch.float32, "cpu", seed=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", gpu_shapes("swiglu", ("mom-340m-prefill", "mom-1.3b-prefill", "decode")))
def test_swiglu_template_gpu_bf16(shape: dict) -> None:
    run_template("swiglu", shape, torch.bfloat16, "cuda", seed=9)
