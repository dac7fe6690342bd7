"""`momtune bench` keeps going after an implementation cannot be captured in a CUDA graph.

On the H200 (2026-11-29) fla's and the reference's layer decode failed their capture (they
synchronise with the host); torch's CUDA generator stayed marked as capturing, and the next batch's
``torch.randn(..., device="cuda")`` raised, losing every row after it. The benchmarks' inputs now
come from a CPU generator, and a failed capture is closed by an empty one.
"""
from __future__ import annotations

import pytest
import torch

from momtune import bench


def test_bench_inputs_are_seeded_and_leave_the_global_generator_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = bench.cuda_randn((3, 5), torch.float32, seed=7, device="cpu")
    ids = bench.cuda_randint(97, (2, 9), seed=7, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)  # the process's generator was not drawn from
    assert torch.equal(a, bench.cuda_randn((3, 5), torch.float32, seed=7, device="cpu"))
    assert not torch.equal(a, bench.cuda_randn((3, 5), torch.float32, seed=8, device="cpu"))
    assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < 97
    # the dtype is applied after drawing: a bf16 input is the float32 draw rounded
    assert torch.equal(bench.cuda_randn((3, 5), torch.bfloat16, seed=7, device="cpu"), a.to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_bench_keeps_its_rows_after_a_failed_capture() -> None:
    x = torch.ones(4, device="cuda")
    failed = bench._graph_fields(lambda: x.sum().item())  # .item() syncs with the host: capture fails
    assert "capture failed" in failed["note"]
    rows = []
    for B in (1, 2):  # the H200 crash came at the second batch, after the reference failed its capture
        rows += bench.bench_layer_decode("tiny", B, ["reference", "momtune"], torch.float32)
    assert [r["impl"] for r in rows] == ["reference", "momtune"] * 2
    assert not [r for r in rows if r.get("note", "").startswith("failed")], rows
    assert all(r["graph_ms"] > 0 for r in rows if r["impl"] == "momtune"), rows
