"""Run the reference tests single-threaded: their tensors are tiny, and with several threads a busy
machine spends far more time in OpenMP hand-offs than in the math (restored after each test)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
