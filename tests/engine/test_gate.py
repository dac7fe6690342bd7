"""momtune.gate's pieces: rounding, the precision an output is held in, derived bounds, verdicts."""
from __future__ import annotations

import math

import pytest
import torch

from momtune.gate import FACTOR, FLOOR, check, derive_bounds, holding_dtype, round_significand, rounded


def test_rounding_to_11_significant_bits_is_fp16_rounding_in_its_range():
    x = torch.randn(10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 100
    x = torch.where(x.abs() < 1e-3, 1.0, x)  # fp16's normal range (no subnormals)
    r = round_significand(x, 11)
    _, e = torch.frexp(x)
    ulp = torch.ldexp(torch.ones_like(x), e - 11)
    assert ((r - x).abs() <= ulp / 2).all()  # nearest
    assert torch.equal(r / ulp, (r / ulp).round())  # 11 significant bits
    # PyTorch's float64 -> float16 may round twice (through float32): equal but at rare near-ties
    assert (r == x.to(torch.float16).to(torch.float64)).double().mean() > 0.999
    big = torch.tensor([1e30, -3e-30], dtype=torch.float64)  # out of fp16's range: the exponent is kept
    assert torch.allclose(round_significand(big, 11), big, rtol=2.0 ** -11) and torch.isfinite(round_significand(big, 11)).all()
    assert torch.equal(rounded(x, torch.float32, tf32=True), round_significand(x, 11))
    assert torch.equal(rounded(x, torch.bfloat16, tf32=True), x.to(torch.bfloat16).double())


def test_an_output_is_held_in_the_coarser_of_its_dtype_and_the_kernels():
    assert holding_dtype(torch.float32, torch.bfloat16) == torch.bfloat16
    assert holding_dtype(torch.bfloat16, torch.float32) == torch.bfloat16
    assert holding_dtype(torch.float32, torch.float16) == torch.float16
    assert holding_dtype(torch.float32, torch.float32) == torch.float32


def test_bounds_are_factor_times_the_rounded_references_error_and_never_zero():
    ref = {"y": torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), "exact": torch.arange(8, dtype=torch.float64),
           "idx": torch.arange(8, dtype=torch.float64)}
    b = derive_bounds(ref, {"y": torch.bfloat16, "exact": torch.bfloat16, "idx": torch.int32})
    r = ref["y"].to(torch.bfloat16).double()
    want = float((r - ref["y"]).norm() / ref["y"].norm())
    assert b["y"].norm == pytest.approx(FACTOR * want)
    assert 1e-3 < want < 2e-3  # bf16: about 2^-9 / sqrt(3)
    assert b["exact"].norm == FACTOR * FLOOR[torch.bfloat16]  # small integers round exactly: the floor
    assert "idx" not in b  # integers must be exact
    # computed in float32 first: the float32 reference's own error counts
    noisy = {"y": ref["y"] * (1 + 1e-2)}
    assert derive_bounds(ref, {"y": torch.float32}, computed=noisy)["y"].norm == pytest.approx(FACTOR * 1e-2, rel=1e-3)


def test_verdicts_name_their_kind():
    ref = {"y": torch.randn(10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), "i": torch.arange(5, dtype=torch.float64)}
    out = {"y": ref["y"].float(), "i": torch.arange(5, dtype=torch.int32)}
    b = derive_bounds(ref, {k: v.dtype for k, v in out.items()})
    assert check(out, ref, b).ok
    cases = {
        "missing": {"y": out["y"]},
        "shape": {**out, "y": out["y"][:50]},
        "unwritten": {**out, "y": torch.where(torch.arange(10_000) == 7, math.nan, out["y"])},
        "not_finite": {**out, "y": torch.where(torch.arange(10_000) == 7, math.inf, out["y"])},
        "integer_mismatch": {**out, "i": torch.tensor([0, 1, 2, 3, 5], dtype=torch.int32)},
        "norm": {**out, "y": out["y"] * 1.001},
        # one element 6e-7 of the scale off: under the norm-wise bound, over the element-wise one
        "elementwise": {**out, "y": (ref["y"] + torch.where(torch.arange(10_000) == 3, 6e-7 * ref["y"].abs().max(),
                                                            0.0)).float()},
    }
    for kind, bad in cases.items():
        v = check(bad, ref, b, "after timing")
        assert not v.ok and v.kind == kind and v.reason.startswith("after timing"), (kind, v)
