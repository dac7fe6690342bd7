"""Timing: interleaved re-timing order, and deterministic winners on ties."""
from __future__ import annotations

import math
import time

import pytest
import torch

from momtune.timing import Timing, TimingOptions, floor_ms, graph_replay, measure, pick_winner, retime_interleaved


def test_retime_is_interleaved_abcabc() -> None:
    calls: list[str] = []
    fns = [lambda n=n: calls.append(n) for n in "ABC"]
    times = retime_interleaved(fns, TimingOptions(interpreter=True, runs=1, rounds=3))
    assert "".join(calls) == "ABCABCABC"
    assert all(t.runs == 3 and math.isfinite(t.median_ms) for t in times)


def test_retime_failing_candidate_is_inf() -> None:
    def boom() -> None:
        raise RuntimeError("x")

    times = retime_interleaved([lambda: None, boom], TimingOptions(interpreter=True, runs=1, rounds=2))
    assert math.isfinite(times[0].median_ms) and times[1].median_ms == math.inf


def test_retime_says_why_a_candidate_is_inf() -> None:
    def boom() -> None:
        raise RuntimeError("an illegal memory access was encountered\nmore")

    errors: list[str] = []
    times = retime_interleaved([lambda: None, boom], TimingOptions(interpreter=True, runs=1, rounds=3), errors=errors)
    assert times[1].median_ms == math.inf and times[1].runs == 0
    assert errors == ["config 1: RuntimeError: an illegal memory access was encountered"]  # once, first line


def test_graph_replay_keeps_what_the_graph_writes_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay owns the captured callable and so the buffers it writes: a caller that keeps only
    the replay (the worker's re-timing builds one per config) must not free them under the graph.
    CUDA's pieces are stood in for: what is checked is who holds what."""
    import contextlib
    import gc
    import weakref

    class FakeGraph:
        replays = 0

        def replay(self) -> None:
            FakeGraph.replays += 1

    monkeypatch.setattr(torch.cuda, "Stream", lambda: type("S", (), {"wait_stream": lambda self, o: None})())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: type("S", (), {"wait_stream": lambda self, o: None})())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def capture() -> tuple[object, weakref.ref]:
        out = {"y": torch.empty(4)}  # what the graph would write
        return graph_replay(lambda: out["y"].fill_(1.0)), weakref.ref(out["y"])

    replay, buffer = capture()
    gc.collect()
    assert buffer() is not None, "the output buffer was freed while the graph still writes to it"
    replay()
    assert FakeGraph.replays == 1
    del replay
    gc.collect()
    assert buffer() is None  # and it is the replay that held it


def test_measure_interpreter_median() -> None:
    t = measure(lambda: time.sleep(0.002), TimingOptions(interpreter=True, runs=3))
    assert t.runs == 3 and 1.5 < t.median_ms < 50


A, B, C = {"BLOCK": 64, "w": 4}, {"BLOCK": 32, "w": 4}, {"BLOCK": 128, "w": 1}


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)], ids=["ABC", "CBA", "BCA"])
def test_tie_goes_to_smallest_canonical_config_in_any_order(order: tuple[int, ...]) -> None:
    cands = [(A, Timing(1.000, 0.0, 5)), (B, Timing(1.005, 0.0, 5)), (C, Timing(1.5, 0.0, 5))]
    ordered = [cands[i] for i in order]
    # A and B tie (within 1%); '{"BLOCK":128...' < '{"BLOCK":32...' < '{"BLOCK":64...' but C is not tied
    assert ordered[pick_winner(ordered)][0] == B


def test_clear_winner_and_spread_widens_ties() -> None:
    cands = [(A, Timing(1.0, 0.0, 5)), (B, Timing(1.05, 0.0, 5))]
    assert cands[pick_winner(cands)][0] == A
    noisy = [(A, Timing(1.0, 0.04, 5)), (B, Timing(1.03, 0.0, 5))]
    assert noisy[pick_winner(noisy)][0] == B  # within the fastest's 4% spread: canonical order decides
    very_noisy = [(A, Timing(1.0, 0.30, 5)), (B, Timing(1.2, 0.0, 5))]
    assert very_noisy[pick_winner(very_noisy)][0] == A  # spread counts up to 5%: beyond, the faster median wins


def test_real_interleaved_timings_of_equal_candidates_pick_same_winner() -> None:
    fns = [lambda: time.sleep(0.004) for _ in range(3)]
    cfgs = [C, A, B]
    for _ in range(2):  # equal work: within noise (50% here), the canonical order decides every time
        times = retime_interleaved(fns, TimingOptions(interpreter=True, runs=3, rounds=3))
        assert cfgs[pick_winner(list(zip(cfgs, times)), rel_tol=0.5)] == C


def test_floor_ms() -> None:
    assert floor_ms(685e12, 0) == pytest.approx(1000.0)
    assert floor_ms(0, 3.0e9) == pytest.approx(1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_times_the_decode_step_without_launch_overhead() -> None:
    """The decode step replayed from a CUDA graph gives eager's answer and a smaller time (eager
    at batch 1 is host-bound: ~0.115 ms for every config on the H100, the kernels ~0.01 ms)."""
    from momtune.kernels import get_template

    t = get_template("decode")
    shape = dict(B=1, H=4, K=256, V=256, E=4, topk=2, shared=1)
    cfg = t.default_for(torch.bfloat16)
    eager_in = t.make_inputs(shape, torch.bfloat16, "cuda", 5)
    expect = {k: v.clone() for k, v in t.launch(eager_in, cfg).items()}
    graph_in = t.make_inputs(shape, torch.bfloat16, "cuda", 5)
    outs: dict[str, torch.Tensor] = {}
    replay = graph_replay(lambda: outs.update(t.launch(graph_in, cfg)))
    fresh = t.make_inputs(shape, torch.bfloat16, "cuda", 5)  # warm-up and capture stepped the cache: reset
    for k, v in fresh.items():
        if isinstance(v, torch.Tensor):
            graph_in[k].copy_(v)
    replay()
    torch.cuda.synchronize()
    assert outs.keys() == expect.keys()
    for k in expect:
        assert torch.equal(outs[k], expect[k]), k
    opts = TimingOptions(interpreter=False)
    eager = measure(lambda: t.launch(eager_in, cfg), opts).median_ms
    assert measure(replay, opts).median_ms < eager


def test_floor_uses_the_measured_peaks_when_given():
    from momtune.timing import NOMINAL_PEAKS

    # 1 GFLOP and 1 GB: compute-bound on neither at H100 nominal (1.46 us vs 333 us)
    assert floor_ms(1e9, 1e9) == pytest.approx(1e9 / NOMINAL_PEAKS["bytes_per_s"] * 1e3)
    h200 = {"flops_per_s": 790e12, "bytes_per_s": 4.3e12}
    assert floor_ms(1e9, 1e9, h200) == pytest.approx(1e9 / 4.3e12 * 1e3)
    assert floor_ms(1e15, 1.0, h200) == pytest.approx(1e15 / 790e12 * 1e3)


@pytest.mark.gpu
def test_measured_peaks_are_those_of_a_datacenter_gpu():
    from momtune.timing import measure_peaks

    p = measure_peaks()
    assert p["measured"] and p["gpu"]
    assert 0.5e12 < p["bytes_per_s"] < 10e12, p  # H100 ~3.0, H200 ~4.3 TB/s copy
    assert 50e12 < p["flops_per_s"] < 2500e12, p  # H100 ~685, H200 ~790 TFLOP/s bf16


def test_short_ops_are_timed_as_graph_replays_and_the_recurrence_eagerly() -> None:
    """On the H200 (session 9) the short prefill ops' eager in-search timings measured the host
    (shared with the compile workers): merge and conv up to 1.7x off a quiet re-timing, routing not
    monotone in the shape. They are timed as CUDA graph replays (their GPU time); the recurrence,
    milliseconds a launch, eagerly. (Their capture on a GPU: the gate-mutant suite's GPU cases run
    every template's trial, graph included.)"""
    from momtune.kernels import get_template, template_names

    graphed = {n for n in template_names() if get_template(n).cuda_graph}
    assert graphed == {"decode", "routing", "norm", "swiglu", "merge", "conv",
                       "routing_bwd", "norm_bwd", "swiglu_bwd", "merge_bwd", "conv_bwd"}, graphed
    assert not get_template("recurrence").cuda_graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("template,shape,configs", [
    ("routing", dict(B=16, T=4096, E=4, topk=2, shared=1, D=2048), [{"BLOCK_T": 64, "num_warps": 4}, {"BLOCK_T": 128, "num_warps": 4}]),
    ("norm", dict(N=65536, D=2048, residual=1), [{"BLOCK_N": 2, "num_warps": 8}, {"BLOCK_N": 1, "num_warps": 4}]),
])
def test_worker_retimes_several_graphed_configs_at_the_largest_shapes(template, shape, configs) -> None:
    """The H200 fault of session 10: re-timing two graph-timed configs at B16 T4096 / N65536 timed
    both as inf (the graphs wrote to freed output buffers) and the next request died of an illegal
    memory access. Every config must get a finite time and the device must stay usable."""
    from momtune.worker import _handle

    reply = _handle({"op": "retime", "template": template, "shape": shape, "dtype": "bfloat16", "seed": 17,
                     "configs": configs, "timing": {"interpreter": False, "rounds": 2}}, "cuda:0", {})
    torch.cuda.synchronize()
    assert reply["status"] == "ok" and reply["errors"] == [], reply
    assert all(math.isfinite(t[0]) and t[0] > 0 for t in reply["times"]), reply
