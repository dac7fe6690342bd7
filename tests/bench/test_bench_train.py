"""`momtune bench --what layer_train` (issue 14): a layer's training step, forward + backward."""
from __future__ import annotations

import pytest
import torch

from momtune import bench


def test_train_kinds_are_bench_kinds() -> None:
    from momtune.report.collect import BENCH_KINDS

    assert {"layer_train", "model_train"} <= set(bench.KINDS) and {"layer_train", "model_train"} <= set(BENCH_KINDS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_layer_train_rows_time_forward_and_backward_and_cross_check_gradients() -> None:
    """float32, the tiny preset: both impls give a row with the step's and the forward's times
    and memory and a finite cross-check of their gradients (their correctness against float64 is
    tests/model/test_fast_lm.py's training-step test)."""
    rows = bench.bench_layer_train("tiny", 2, 64, ["momtune", "reference"], torch.float32)
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"momtune", "reference"} and not any("note" in r for r in rows), rows
    for r in rows:
        assert 0 < r["fwd_ms"] < r["ms"] and r["peak_mem_mb"] > 0 and r["kind"] == "layer_train"
    assert 0 <= by["reference"]["max_rel_err_vs_momtune"] < float("inf"), by["reference"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_train_rows_time_an_optimizer_step() -> None:
    """float32, the tiny preset: both impls give a row with a step's time, memory and first loss
    (their gradients' correctness is tests/model's training-step tests)."""
    rows = bench.bench_model_train("tiny", 2, 32, ["momtune", "reference"], torch.float32)
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"momtune", "reference"} and not any("note" in r for r in rows), rows
    assert all(r["ms"] > 0 and r["peak_mem_mb"] > 0 and r["kind"] == "model_train" for r in rows)
    assert all(0 < r["loss"] < float("inf") for r in rows), rows

