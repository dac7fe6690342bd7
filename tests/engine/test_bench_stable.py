"""momtune.bench.stable_time, the timing every benchmark row uses (issue 12, item 1): warm until
two successive medians agree within 3%, then at least 30 calls; median and min-max spread."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from momtune.bench import MIN_CALLS, Measured, stable_time


def fake_timer(times: Iterator[float]) -> Callable[[Callable[[], Any]], float]:
    def timer(fn: Callable[[], Any]) -> float:
        fn()
        return next(times)
    return timer


def test_warm_up_lasts_until_two_medians_agree_then_30_calls_are_timed() -> None:
    calls = []
    # first call 500 ms (compile), then an autotuner's slow rounds 10 -> 4 -> 2.1 -> 2.0 ms
    seq = iter([500.0, 10.0] + [10.0] * 30 + [4.0] * 30 + [2.1] * 30 + [2.0] * 30 + [2.0 + 0.01 * (i % 5) for i in range(60)])
    m = stable_time(lambda: calls.append(1), timer=fake_timer(seq))
    assert m.warmup_rounds == 5  # 10, then 4 (no), 2.1 (no), 2.0 (4.8% off: no), 2.0 (yes)
    assert m.calls == MIN_CALLS and m.median_ms == pytest.approx(2.02) and m.min_ms == 2.0 and m.max_ms == 2.04
    assert len(calls) == 2 + 5 * 30 + MIN_CALLS  # nothing timed was thrown away silently


def test_a_time_that_never_settles_is_reported_as_such() -> None:
    seq = iter([1.0, 1.0] + [1.0 + 0.1 * i for i in range(10_000)])  # keeps drifting by more than 3%
    m = stable_time(lambda: None, max_rounds=5, timer=fake_timer(seq))
    assert m.warmup_rounds == 5 and m.calls == MIN_CALLS and m.max_ms > m.min_ms


def test_slow_calls_use_short_rounds_but_at_least_three() -> None:
    seq = iter([2000.0] * 1000)  # 2 s a call: rounds of 3, not 30
    m = stable_time(lambda: None, calls=5, budget_ms=60_000.0, timer=fake_timer(seq))
    assert m.warmup_rounds == 2 and m.calls == 5 and m.median_ms == 2000.0


def test_fields_name_every_number_of_a_row() -> None:
    m = Measured(1.5, 1.4, 1.9, 30, 3)
    assert m.fields() == {"ms": 1.5, "ms_min": 1.4, "ms_max": 1.9, "calls": 30, "warmup_rounds": 3}
    assert m.fields("graph")["graph_ms"] == 1.5 and m.fields("graph")["graph_ms_max"] == 1.9


def test_bench_ratios_compare_eager_with_eager_and_graph_with_graph() -> None:
    """The README once divided fla's eager time by momtune's graph time (252x); the table's ratios
    never mix the two."""
    from momtune.commands.bench import ratios

    key = {"kind": "model_decode", "name": "mom-340m", "shape": {"B": 1}}
    rows = [{**key, "impl": "momtune", "ms": 0.79, "graph_ms": 0.026},
            {**key, "impl": "fla", "ms": 9.10},  # fla: no graph
            {**key, "impl": "reference", "ms": 7.9, "graph_ms": 0.26}]
    assert ratios(rows) == [("", ""), ("11.52x", ""), ("10.00x", "10.00x")]


def test_bench_json_prints_the_bench_file_on_stdout(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """`momtune bench --json`: the rows as JSON on stdout, the same as the --out file; progress and
    the table on stderr. The GPU is faked (the timings are GPU work; this checks the plumbing)."""
    import json

    import torch

    import momtune.bench as bench
    import momtune.provenance as provenance
    from momtune.cli import main

    row = {"kind": "layer_decode", "name": "tiny", "shape": {"B": 1}, "dtype": "bfloat16", "impl": "momtune",
           "ms": 0.5, "ms_min": 0.4, "ms_max": float("inf"), "calls": 30, "warmup_rounds": 2}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(provenance, "collect", lambda *a, **k: {"gpu": "fake"})
    monkeypatch.setattr(bench, "bench_layer_decode", lambda *a, **k: [dict(row)])
    out = tmp_path / "b.json"
    assert main(["bench", "--json", "--what", "layer_decode", "--batches", "1", "--impls", "momtune",
                 "--presets", "tiny", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    printed = json.loads(cap.out)
    assert printed["rows"][0]["ms"] == 0.5 and printed["rows"][0]["ms_max"] is None  # no NaN/inf in JSON
    assert json.loads(out.read_text())["rows"][0]["ms"] == 0.5
    assert "layer_decode tiny" in cap.err and "momtune bench" in cap.err


def test_a_group_that_raises_is_a_failed_row_and_the_run_goes_on(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """On the H200 (2026-11-29) one decode batch raised outside the per-implementation guards and
    every later row was lost; now that group's rows say why, the next groups run, and the exit
    status is 1."""
    import json

    import torch

    import momtune.bench as bench
    import momtune.provenance as provenance
    from momtune.cli import main

    def decode(preset, B, impls, dtype, prompt=16):  # noqa: ANN001
        if B == 1:
            raise RuntimeError("Offset increment outside graph capture encountered unexpectedly.")
        return [{"kind": "layer_decode", "name": preset, "shape": {"B": B}, "dtype": "bfloat16", "impl": i,
                 "ms": 0.5, "ms_min": 0.4, "ms_max": 0.6, "calls": 30, "warmup_rounds": 2} for i in impls]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(provenance, "collect", lambda *a, **k: {"gpu": "fake"})
    monkeypatch.setattr(bench, "bench_layer_decode", decode)
    out = tmp_path / "b.json"
    rc = main(["bench", "--what", "layer_decode", "--batches", "1", "8", "--impls", "momtune", "fla",
               "--presets", "tiny", "--out", str(out)])
    assert rc == 1
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"]["B"], r["impl"]) for r in rows] == [(1, "momtune"), (1, "fla"), (8, "momtune"), (8, "fla")]
    assert all(r["note"].startswith("failed: RuntimeError: Offset increment") for r in rows[:2])
    assert all(r["ms"] == 0.5 for r in rows[2:])
    assert "1 group(s) failed: layer_decode tiny {'B': 1}" in capsys.readouterr().err
