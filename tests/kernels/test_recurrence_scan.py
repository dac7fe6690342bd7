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


@pytest.mark.parametrize(("cu", "chunk", "K", "V", "block_v"),
                         [([0, 13, 13, 40], 16, 16, 24, 16), ([0, 70], 16, 20, 16, 16), ([0, 1, 5], 16, 16, 16, 32),
                          ([0, 0, 9], 16, 32, 40, 32), ([0, 33, 97], 32, 16, 16, 16)],
                         ids=["ragged-empty", "one-segment-K20", "short", "leading-empty-V40", "two-chunks-of-32"])
def test_scanned_backward_matches_autograd(cu: list[int], chunk: int, K: int, V: int, block_v: int) -> None:
    gen = torch.Generator().manual_seed(len(cu) * 100 + chunk + K)
    N, H = cu[-1], 2
    q, k = torch.randn(N, H, K, generator=gen), torch.randn(N, H, K, generator=gen)
    v, do = torch.randn(N, H, V, generator=gen), torch.randn(N, H, V, generator=gen)
    g, b = -torch.rand(N, H, generator=gen), torch.rand(N, H, generator=gen)
    cu_t = torch.tensor(cu)

    def autograd(dt: torch.dtype) -> tuple[torch.Tensor, ...]:
        leaves = [t.to(dt).requires_grad_(True) for t in (q, k, v, g, b)]
        o, _ = recurrent_chunked(*leaves, cu_seqlens=cu_t, chunk_size=chunk)
        return torch.autograd.grad(o, leaves, do.to(dt))

    want, want32 = autograd(torch.float64), autograd(torch.float32)
    scans = TritonScans(dot="ieee", block_v=block_v, poison=True)
    got = gated_delta_backward(q, k, v, g, b, do, cu_seqlens=cu_t, chunk_size=chunk, scans=scans)
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
