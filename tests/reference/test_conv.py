"""short_conv over ragged segments (empty and length-1 included) == conv_step token by token."""
from __future__ import annotations

import pytest
import torch

from momtune.reference.conv import conv_step, short_conv
from tests.helpers import assert_close


@pytest.mark.parametrize("window", [False, True], ids=["W4-C5-zero-history", "W4-C5-cached-window"])
def test_short_conv_ragged_equals_steps(window: bool) -> None:
    g = torch.Generator().manual_seed(0)
    lengths = [0, 3, 1, 0, 6]
    cu = torch.tensor([0] + lengths).cumsum(0)
    x = torch.randn(sum(lengths), 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 1, 4, generator=g, dtype=torch.float64)
    w0 = torch.randn(len(lengths), 3, 5, generator=g, dtype=torch.float64) if window else None
    y, fw = short_conv(x, w, cu, w0)
    assert y.shape == x.shape and fw.shape == (len(lengths), 3, 5)
    for s, n in enumerate(lengths):
        win = w0[s:s + 1] if window else torch.zeros(1, 3, 5, dtype=torch.float64)
        for t in range(int(cu[s]), int(cu[s]) + n):
            ys, win = conv_step(x[t:t + 1], win, w)
            assert_close(f"y[{t}]", y[t:t + 1], ys, atol=1e-14, rtol=1e-12)
        assert torch.equal(fw[s], win[0]), f"final window of segment {s}"  # empty: unchanged


def test_current_token_uses_last_tap() -> None:
    """weight[:, W-1] multiplies the current token: a one-hot last tap copies silu(x)."""
    w = torch.zeros(2, 1, 4, dtype=torch.float64)
    w[:, 0, 3] = 1.0
    x = torch.randn(5, 2, dtype=torch.float64)
    assert_close("y", short_conv(x, w)[0], torch.nn.functional.silu(x), atol=1e-15, rtol=0)
