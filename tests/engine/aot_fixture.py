"""Two tiny launchers for the compile-gate test: the norm kernel's old bug (a ``tl.constexpr``
compared with a runtime value picks the branch, so both are compiled and their masks' types
differ) and its fix (the comparison made on the host, passed as a constexpr)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _broken(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    if BLOCK == N:
        mask = cols < BLOCK  # a tensor of i1
    else:
        mask = (cols < N)[None, :]  # another shape
    tl.store(y_ptr + cols[None, :], tl.load(x_ptr + cols[None, :], mask=mask), mask=mask)


@triton.jit
def _fixed(x_ptr, y_ptr, N, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    if EVEN:
        mask = cols < BLOCK
    else:
        mask = cols < N
    tl.store(y_ptr + cols, tl.load(x_ptr + cols, mask=mask), mask=mask)


def launch(which: str, n: int) -> None:
    x = torch.randn(n)
    y = torch.empty_like(x)
    block = triton.next_power_of_2(n)
    if which == "broken":
        _broken[(1,)](x, y, n, BLOCK=block)
    else:
        _fixed[(1,)](x, y, n, BLOCK=block, EVEN=block == n)
