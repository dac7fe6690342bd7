"""GPU-free resource checks: compile kernels for sm_90 (the H100) on the CPU with Triton's bundled
ptxas and assert the defaults fit the hardware's shared memory.

This catches a real failure seen on the H100: the recurrence default at fp32, K = V = 256 with
2 pipeline stages needs 377 KB of shared memory (limit 227 KB).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import triton

from momtune.resources import H100_SHARED_LIMIT, shared_memory_isolated

pytestmark = pytest.mark.skipif(
    not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
    reason="needs Triton's bundled ptxas to compile for sm_90 on the CPU")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_recurrence_default_fits_h100_shared_memory(dtype):
    from momtune.kernels import get_template

    cfg = get_template("recurrence").default_for(getattr(torch, dtype))
    shared = shared_memory_isolated(dtype, cfg, K=256, V=256)
    assert 0 < shared <= H100_SHARED_LIMIT, f"default {cfg} at {dtype}, K=V=256 needs {shared} B"


def test_resource_check_detects_an_oversized_config():
    from momtune.kernels.recurrence.chunk import DEFAULT_CONFIG

    shared = shared_memory_isolated("float32", dict(DEFAULT_CONFIG, num_stages=2), K=256, V=256)
    assert shared > H100_SHARED_LIMIT  # 377344 B: the out-of-resource failure seen on the H100
