"""`momtune bench --what layer_train` (issue 14): a layer's training step, forward + backward."""
from __future__ import annotations

import pytest
import torch

from momtune import bench


def test_layer_train_is_a_bench_kind() -> None:
    assert "layer_train" in bench.KINDS


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
