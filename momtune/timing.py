"""Timing: one candidate, interleaved re-timing of the best few, deterministic winners.

On CUDA, ``triton.testing.do_bench`` times the candidate (``return_mode="all"``; we take the
median of its runs, exactly what ``return_mode="median"`` returns, and keep the spread). do_bench
flushes the L2 cache before every run by writing a 256 MB buffer, so numbers are cold-cache
times. In the Triton interpreter (no GPU) a candidate is timed with ``time.perf_counter`` over a
few calls (median): those timings measure the interpreter, not a GPU, and are marked so.
Templates marked ``Template.cuda_graph`` (decode, which the model runs in a graph, and the short
prefill ops whose kernels are shorter than their launch) are timed on a GPU as a replay of the
captured launch (:func:`graph_replay`): their GPU time, which a config changes, not the host's.
"""
from __future__ import annotations

import math

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .space import canonical

FLOP_PEAK = 685e12  # H100 SXM dense bf16 FLOP/s: the floor's nominal peak where none is measured
BYTES_PEAK = 3.0e12  # H100 SXM HBM3 B/s (the interpreter; a GPU's own are measured: measure_peaks)
NOMINAL_PEAKS = {"flops_per_s": FLOP_PEAK, "bytes_per_s": BYTES_PEAK, "gpu": "H100 SXM", "measured": False}


@dataclass(frozen=True)
class TimingOptions:
    interpreter: bool
    warmup_ms: float = 25.0  # do_bench warmup (CUDA)
    rep_ms: float = 100.0  # do_bench repetition budget (CUDA)
    runs: int = 3  # perf_counter runs (interpreter)
    rounds: int = 5  # interleaved re-timing rounds


@dataclass(frozen=True)
class Timing:
    median_ms: float
    spread: float  # relative: (q3 - q1) / median of the runs, or (max - min) / median for few runs
    runs: int


def _summary(times: Sequence[float]) -> Timing:
    xs = sorted(float(t) for t in times)
    med = statistics.median(xs)
    if len(xs) >= 4:
        q = statistics.quantiles(xs, n=4)
        lo, hi = q[0], q[2]
    else:
        lo, hi = xs[0], xs[-1]
    return Timing(med, (hi - lo) / med if med > 0 else 0.0, len(xs))


def measure(fn: Callable[[], Any], opts: TimingOptions) -> Timing:
    """Time ``fn`` (already run once and checked by the caller)."""
    if opts.interpreter:
        times = []
        for _ in range(max(1, opts.runs)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return _summary(times)
    import triton.testing

    times = triton.testing.do_bench(fn, warmup=opts.warmup_ms, rep=opts.rep_ms, return_mode="all")
    return _summary(times)


def graph_replay(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured once in a CUDA graph; returns the replay (what a CUDA-graph caller pays:
    the kernels, not the host's launches). ``fn`` must be capturable (no host synchronisation)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (compiles, allocator pools)
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()

    # The replay holds ``fn`` and with it every tensor ``fn`` reaches (inputs, output buffers):
    # the graph writes to their addresses. Returning only ``graph.replay`` let a caller's output
    # buffers be freed while the graph still wrote to them: the re-timing of several configs at
    # the largest shapes then faulted with an illegal memory access (H200, session 10).
    def replay(_graph: Any = graph, _fn: Callable[[], Any] = fn) -> None:
        _graph.replay()

    return replay


def retime_interleaved(fns: Sequence[Callable[[], Any]], opts: TimingOptions,
                       timer: Callable[[Callable[[], Any]], Timing] | None = None,
                       errors: list[str] | None = None) -> list[Timing]:
    """Time every fn once per round in turn (ABCABC...); per fn, the median and spread of its round medians.

    A fn that raises is timed as inf from then on; ``errors`` (when given) gets one line per such
    fn: its index and the exception.
    """
    timer = timer or (lambda f: measure(f, opts))
    per: list[list[float]] = [[] for _ in fns]
    dead = [False] * len(fns)
    for _ in range(max(1, opts.rounds)):
        for i, fn in enumerate(fns):
            if dead[i]:
                continue
            try:
                per[i].append(timer(fn).median_ms)
            except Exception as exc:  # noqa: BLE001 - a candidate that fails now is out
                dead[i] = True
                if errors is not None:
                    from .validate import first_line

                    errors.append(f"config {i}: {first_line(exc)}")
    return [_summary(p) if p and not dead[i] else Timing(float("inf"), 0.0, 0) for i, p in enumerate(per)]


#: a relative difference below this is noise whatever the measured spreads say
NOISE_FLOOR = 0.02


def judge(tuned_ms: float, default_ms: float, tuned_spread: float, default_spread: float) -> str:
    """"faster", "slower" or "within noise": a config's time against the default's, both re-timed
    interleaved in one process; noise is the larger relative spread of the two (at least
    NOISE_FLOOR)."""
    noise = max(tuned_spread, default_spread, NOISE_FLOOR)
    if not (math.isfinite(tuned_ms) and math.isfinite(default_ms)) or default_ms <= 0:
        return "within noise"
    if tuned_ms > default_ms * (1 + noise):
        return "slower"
    if tuned_ms < default_ms / (1 + noise):
        return "faster"
    return "within noise"


def pick_winner(candidates: Sequence[tuple[Mapping[str, Any], Timing]], rel_tol: float = 0.01,
                max_tol: float = 0.05) -> int:
    """Index of the winner: the fastest, except that candidates within noise of the fastest
    (``max(rel_tol, spread of the fastest)``, the spread counting up to ``max_tol``) tie, and a tie
    goes to the smallest canonical JSON string of the config — so every machine picks the same
    winner from equal timings. Noisier measurements than ``max_tol`` do not make a tie: there the
    faster median is the better guess."""
    if not candidates:
        raise ValueError("pick_winner: no candidates")
    best = min(range(len(candidates)), key=lambda i: candidates[i][1].median_ms)
    best_t = candidates[best][1]
    if best_t.median_ms == float("inf"):
        return best
    tol = max(rel_tol, min(best_t.spread, max_tol))
    tied = [i for i, (_, t) in enumerate(candidates) if t.median_ms <= best_t.median_ms * (1.0 + tol)]
    return min(tied, key=lambda i: canonical(candidates[i][0]))


def floor_ms(flops: float, nbytes: float, peaks: Mapping[str, Any] | None = None) -> float:
    """The roofline floor in ms: max(flops / peak FLOP/s, bytes / peak B/s), with ``peaks`` measured
    on this GPU (:func:`measure_peaks`), else the nominal H100 SXM ones (685 TFLOP/s, 3.0 TB/s)."""
    p = peaks or NOMINAL_PEAKS
    return max(flops / float(p["flops_per_s"]), nbytes / float(p["bytes_per_s"])) * 1e3


def measure_peaks(device: str = "cuda", copy_bytes: int = 1 << 30, gemm: int = 8192) -> dict[str, Any]:
    """This GPU's copy bandwidth (a ``copy_bytes`` device-to-device copy: read + write) and dense
    bf16 GEMM rate (``gemm``^3), each the median of ``do_bench`` after warm-up: the peaks every
    floor of the run is computed from (a few seconds)."""
    import torch
    import triton

    def copy_ms() -> float:
        src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")

    def gemm_time_ms() -> float:
        a = torch.randn(gemm, gemm, device=device, dtype=torch.bfloat16)
        b = torch.randn(gemm, gemm, device=device, dtype=torch.bfloat16)
        return triton.testing.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")

    copy, gemm_ms = copy_ms(), gemm_time_ms()  # each frees its buffers on return
    torch.cuda.empty_cache()
    return {"flops_per_s": 2.0 * gemm**3 / (gemm_ms * 1e-3), "bytes_per_s": 2.0 * copy_bytes / (copy * 1e-3),
            "gpu": torch.cuda.get_device_name(), "measured": True,
            "how": f"copy of {copy_bytes / 2**30:g} GiB (read + write); bf16 GEMM {gemm}^3; do_bench medians"}
