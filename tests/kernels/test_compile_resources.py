"""GPU-free resource checks: compile kernels for sm_90 (the H100) on the CPU with Triton's bundled
ptxas and assert the defaults fit the hardware's shared memory.

This catches a real failure seen on the H100: the recurrence default at fp32, K = V = 256 with
2 pipeline stages needs 377 KB of shared memory (limit 227 KB). Also checks the three kernels of
STATES="memory" (pre-pass, state pass, output) and that the search space's shared-memory estimate
for it agrees with the compiler on both sides of the limit.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import triton

from momtune.resources import H100_SHARED_LIMIT, resources_isolated, shared_memory_isolated

SM89_SHARED_LIMIT = 99 * 1024  # opt-in shared memory per block on sm_86 / sm_89 (CUDA guide)

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


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_recurrence_memory_states_default_fits_h100_shared_memory(dtype):
    """STATES="memory" at its default (the dtype's default with STATES="memory"): the pre-pass, the
    state pass and the output kernel each fit the H100's shared memory at K = V = 256."""
    from momtune.kernels import get_template

    cfg = dict(get_template("recurrence").default_for(getattr(torch, dtype)), STATES="memory")
    res = resources_isolated(dtype, cfg, K=256, V=256)
    assert set(res) == {"prepass", "recurrence", "output"}
    for kernel, r in res.items():
        assert 0 < r["shared"] <= H100_SHARED_LIMIT, f"{kernel} of {cfg} at {dtype}, K=V=256 needs {r['shared']} B"


def test_recurrence_memory_states_constraint_matches_compile():
    """The search space's shared-memory estimate for STATES="memory" agrees with the compiler on
    both sides of the limit (3 stages at BT 64, BV 64: 208.5 KiB fits; with PRE_QK 240 KiB does not)."""
    from momtune.kernels import get_template

    tmpl = get_template("recurrence")
    shape = dict(N=4096, S=8, H=4, K=256, V=256)
    for extra, fits in ((dict(), True), (dict(PRE_QK=True), False)):
        cfg = dict(tmpl.default_config, STATES="memory", num_stages=3, **extra)
        shared = resources_isolated("bfloat16", cfg, ["recurrence"], K=256, V=256)["recurrence"]["shared"]
        assert (shared <= H100_SHARED_LIMIT) == fits, (extra, shared)
        assert (tmpl.check_config(shape, cfg) == "") == fits, (extra, tmpl.check_config(shape, cfg))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_recurrence_fallback_fits_small_gpus_and_default_does_not(dtype):
    """On sm_89 (L4, RTX 4090: 99 KiB of shared memory per block) the bf16 default needs 144 KiB,
    so the fast model falls back; the template's fallback fits there in every kernel: at most 48
    KiB in bf16, and within the 99 KiB in float32 (68 KiB since float32 dots run in IEEE float32
    by default: IEEE dots stage more through shared memory than TF32 ones)."""
    from momtune.kernels import get_template

    tmpl = get_template("recurrence")
    base = tmpl.default_for(getattr(torch, dtype))
    [fallback] = tmpl.fallbacks
    limit = 48 * 1024 if dtype == "bfloat16" else SM89_SHARED_LIMIT
    res = resources_isolated(dtype, {**base, **fallback}, K=256, V=256, capability=89)
    for kernel, r in res.items():
        assert 0 < r["shared"] <= limit, f"{kernel} of the fallback at {dtype} needs {r['shared']} B"
    if dtype == "bfloat16":
        assert shared_memory_isolated(dtype, base, K=256, V=256, capability=89) > 99 * 1024
