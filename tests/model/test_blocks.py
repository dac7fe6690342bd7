"""momtune.functions._Blocks: the fused projection's column blocks as views whose backward writes
every block's gradient into one buffer, against autograd's own slicing."""
from __future__ import annotations

import pytest
import torch

from momtune.functions import _Blocks


@pytest.mark.parametrize("expand", [False, True], ids=["per-slot", "expanded-slot"])
def test_blocks_gradient_is_autograds(expand: bool) -> None:
    """Blocks with gaps between them, a slot axis (strided or expanded: its gradient summed), an
    unused block (no gradient: zeros there) and uncovered columns (zeros): the same gradient as
    autograd's slice backwards, bit for bit in float64, and the same forward values."""
    N, cols, M = 7, 64, 3
    gen = torch.Generator().manual_seed(0)

    def views(p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, g = p[:, 0:5], p[:, 8:11]
        if expand:
            k, v = p[:, None, 16:20].expand(N, M, 4), p[:, None, 24:30].expand(N, M, 6)
        else:
            s = p[:, 16:16 + M * 16].view(N, M, 16)
            k, v = s[:, :, 0:4], s[:, :, 8:14]
        return q, g, k, v

    x = torch.randn(N, cols, dtype=torch.float64, generator=gen, requires_grad=True)
    outs = _Blocks.apply(x, views)
    ws = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in outs]
    (got,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs[:3], ws)), x)  # v unused
    x2 = x.detach().requires_grad_(True)
    outs2 = views(x2)
    (want,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs2[:3], ws)), x2)
    assert all(torch.equal(a, b) for a, b in zip(outs, outs2))
    assert torch.equal(got, want)
    assert bool((got[:, 5:8] == 0).all()) and bool(got[:, 0:5].ne(0).all())


def test_blocks_refuses_a_view_that_is_not_a_column_block() -> None:
    x = torch.randn(6, 8, requires_grad=True)
    with pytest.raises(ValueError, match="not a column block"):
        _Blocks.apply(x, lambda p: (p[1:, 0:2],))
