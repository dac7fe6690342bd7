"""The correctness gate: poisoning, comparison with the reference, failure classification."""
from __future__ import annotations

import ast
import math

import pytest
import torch
import triton

from momtune.validate import classify, compare, first_line, poison_like


def test_poison_like_floats_nan_ints_minus_one() -> None:
    out = poison_like({"o": torch.zeros(3, dtype=torch.bfloat16), "i": torch.zeros(2, dtype=torch.int32),
                       "b": torch.zeros(2, dtype=torch.bool)})
    assert torch.isnan(out["o"]).all() and out["o"].dtype == torch.bfloat16
    assert (out["i"] == -1).all() and out["i"].dtype == torch.int32
    assert out["b"].all()


def test_compare_within_tolerance_reports_errors() -> None:
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    out = (ref + torch.tensor([1e-4, 0.0, -2e-4], dtype=torch.float64)).float()
    chk = compare({"y": out}, {"y": ref}, atol=1e-3, rtol=1e-3)
    assert chk.ok and chk.reason == ""
    assert chk.max_abs_err == pytest.approx(2e-4, rel=1e-3)
    assert chk.max_rel_err == pytest.approx(2e-4 / 4.0, rel=1e-3)


def test_compare_wrong_value_names_output_and_index() -> None:
    ref = torch.zeros(2, 3, dtype=torch.float64)
    out = ref.clone().float()
    out[1, 2] = 0.5
    chk = compare({"y": out}, {"y": ref}, atol=1e-3, rtol=1e-3)
    assert not chk.ok and "output 'y'" in chk.reason and "(1, 2)" in chk.reason and "1/6" in chk.reason


def test_compare_unwritten_nan_is_wrong_answer() -> None:
    ref = torch.ones(4, dtype=torch.float64)
    out = poison_like({"y": torch.ones(4)})["y"]
    out[:3] = 1.0
    chk = compare({"y": out}, {"y": ref}, atol=1.0, rtol=1.0)
    assert not chk.ok and "NaN" in chk.reason and "(3,)" in chk.reason and math.isinf(chk.max_abs_err)


def test_compare_integers_exact_and_missing_key_and_shape() -> None:
    ref = {"idx": torch.tensor([0, 1, 2], dtype=torch.int64)}
    assert compare({"idx": torch.tensor([0, 1, 2], dtype=torch.int32)}, ref, 1.0, 1.0).ok
    assert not compare({"idx": torch.tensor([0, 1, 3], dtype=torch.int32)}, ref, 1.0, 1.0).ok
    assert "missing" in compare({}, ref, 1e-3, 1e-3).reason
    assert "shape" in compare({"idx": torch.zeros(4, dtype=torch.int32)}, ref, 1e-3, 1e-3).reason


CASES = [
    ("compilation-error", triton.compiler.errors.CompilationError("def k(): pass", ast.parse("x").body[0], "bad tile"),
     "compile_error", "bad tile"),
    ("out-of-resources", triton.runtime.errors.OutOfResources(300000, 232448, "shared memory"), "out_of_resources",
     "out of resource"),
    ("oor-text", RuntimeError("triton: out of resource: shared memory"), "out_of_resources", "shared memory"),
    ("illegal-memory", RuntimeError("CUDA error: an illegal memory access was encountered\nmore"), "illegal_memory",
     "illegal memory access"),
    ("device-oom", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 384.00 MiB\nmore"), "out_of_memory",
     "CUDA out of memory"),
    ("device-oom-text", RuntimeError("CUDA error: out of memory\nmore"), "out_of_memory", "out of memory"),
    ("other", ValueError("first line\nsecond line"), "error", "ValueError: first line"),
]


@pytest.mark.parametrize("exc,status,reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classify(exc: BaseException, status: str, reason: str) -> None:
    got_status, got_reason = classify(exc)
    assert got_status == status
    assert reason in got_reason and "\n" not in got_reason and "second line" not in got_reason


def test_first_line_of_text() -> None:
    assert first_line("\n  a\nb") == "a"
