"""The recurrence backward's two scans as Triton kernels (kernels/recurrence/scan.py): the chunk
backward of gated_delta_backward with its forward-state and state-gradient scans on the kernels,
against float64 autograd of the chunked recurrence, on ragged segments, empty ones and partial
last chunks, outputs poisoned with NaN; on the CPU in Triton's interpreter (exact float32 dots)."""
from __future__ import annotations

import pytest
import torch

from momtune.errors import InputError
from momtune.kernels.recurrence.scan import TritonScans, forward_scan
from momtune.reference.recurrence import gated_delta_backward, recurrent_chunked
from tests.helpers import gated_delta_autograd, gated_delta_case


@pytest.mark.parametrize(("cu", "chunk", "K", "V", "block_v"),
                         [([0, 13, 13, 40], 16, 16, 24, 16), ([0, 70], 16, 20, 16, 16), ([0, 1, 5], 16, 16, 16, 32),
                          ([0, 0, 9], 16, 32, 40, 32), ([0, 33, 97], 32, 16, 16, 16)],
                         ids=["ragged-empty", "one-segment-K20", "short", "leading-empty-V40", "two-chunks-of-32"])
@pytest.mark.parametrize("layout", ["KV", "VK"])
def test_scanned_backward_matches_autograd(cu: list[int], chunk: int, K: int, V: int, block_v: int,
                                           layout: str) -> None:
    case = gated_delta_case(cu, 2, K, V, seed=len(cu) * 100 + chunk + K)
    want, want32 = (gated_delta_autograd(case, dt, chunk) for dt in (torch.float64, torch.float32))
    scans = TritonScans(dot="ieee", block_v=block_v, poison=True, layout=layout)
    got = gated_delta_backward(*(case[n] for n in ("q", "k", "v", "g", "beta", "do")),
                               cu_seqlens=case["cu_seqlens"], chunk_size=chunk, scans=scans)
    for name, a, w, w32 in zip(("dq", "dk", "dv", "dg", "dbeta"), got, want, want32):
        assert a.dtype == torch.float32 and a.shape == w.shape and bool(torch.isfinite(a).all()), name
        err, own = (float((x.double() - w).norm() / w.norm()) for x in (a, w32))
        assert err <= 4 * max(own, torch.finfo(torch.float32).eps), (name, err, own)


def test_scan_inputs_are_checked() -> None:
    w = torch.zeros(2, 1, 16, 16)
    table, nch = torch.zeros(1, 2, dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    with pytest.raises(InputError, match="u: expected shape"):
        forward_scan(w, torch.zeros(2, 1, 8, 16), w, torch.zeros(2, 1), torch.zeros(1, 1, 16, 16), table, nch)
    with pytest.raises(InputError, match="w: expected float32"):
        forward_scan(w.double(), torch.zeros(2, 1, 16, 16), w, torch.zeros(2, 1), torch.zeros(1, 1, 16, 16), table, nch)
    with pytest.raises(InputError, match="table, nch: expected int32"):
        forward_scan(w, torch.zeros(2, 1, 16, 16), w, torch.zeros(2, 1), torch.zeros(1, 1, 16, 16), table.long(), nch)
    with pytest.raises(InputError, match="dot"):
        TritonScans(dot="bf16")
    with pytest.raises(InputError, match="layout: expected one of KV, VK, got 'kv'"):
        TritonScans(layout="kv")
    with pytest.raises(InputError, match="layout"):
        forward_scan(w, torch.zeros(2, 1, 16, 16), w, torch.zeros(2, 1), torch.zeros(1, 1, 16, 16), table, nch,
                     layout="T")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dot", ["ieee", "tf32"])
def test_gpu_scanned_backward_at_the_model_shape(dot: str) -> None:
    """K = V = 256, chunks of 64, 5 ragged segments (one empty), on the GPU: the scanned backward
    against float64 autograd within 4 x the error of the PyTorch chunk backward run at the same
    matmul precision (TF32 matmuls for the "tf32" dots: torch's allow_tf32)."""
    gen = torch.Generator().manual_seed(11)
    cu = [0, 300, 300, 1000, 1030, 1500]
    N, H, K, V = cu[-1], 2, 256, 256
    dev = "cuda"
    q, k = (torch.randn(N, H, K, generator=gen).to(dev) for _ in range(2))
    v, do = (torch.randn(N, H, V, generator=gen).to(dev) for _ in range(2))
    g, b = (-0.1 * torch.rand(N, H, generator=gen)).to(dev), torch.rand(N, H, generator=gen).to(dev)
    cu_t = torch.tensor(cu, device=dev)
    leaves = [t.double().requires_grad_(True) for t in (q, k, v, g, b)]
    o, _ = recurrent_chunked(*leaves, cu_seqlens=cu_t, chunk_size=64)
    want = torch.autograd.grad(o, leaves, do.double())
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = dot == "tf32"
        own = gated_delta_backward(q, k, v, g, b, do, cu_seqlens=cu_t, chunk_size=64)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    got = gated_delta_backward(q, k, v, g, b, do, cu_seqlens=cu_t, chunk_size=64,
                               scans=TritonScans(dot=dot, poison=True))
    for name, a, w, r in zip(("dq", "dk", "dv", "dg", "dbeta"), got, want, own):
        assert bool(torch.isfinite(a).all()), name
        err, ref_err = (float((x.double() - w).norm() / w.norm()) for x in (a, r))
        assert err <= 4 * max(ref_err, torch.finfo(torch.float32).eps), (name, err, ref_err)


@pytest.mark.parametrize("layout", ["KV", "VK"])
@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_scans_compile_for_hopper_within_its_shared_memory(kernel: str, layout: str) -> None:
    """The interpreter never compiles: both scans compile for sm_90 at the model's K = V = 256,
    chunks of 64, V blocks of 32 (TritonScans' default), under the H100/H200's limit, in both
    state layouts."""
    from momtune.resources import H100_SHARED_LIMIT, scan_resources_isolated

    assert 0 < scan_resources_isolated(kernel, layout=layout)["shared"] <= H100_SHARED_LIMIT
