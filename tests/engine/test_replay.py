"""Sampler replay (momtune.replay): a search of a recorded landscape through the search driver,
the worker's answers taken from the landscape. It measures what the driver would (budget, claims,
batches), repeats per seed, searches only the recorded configs of a partial study, and the
learning samplers (pattern, TPE) ask a few configs at a time, so each batch follows the results
of the ones before."""
from __future__ import annotations

import math

import pytest

from momtune.replay import Landscape, replay, restricted
from momtune.space import canonical, parse_space

from .conftest import FAKE

SPACE = """
[template]
name = "fake"
[parameters.BT]
choices = [16, 32, 64]
default = 32
[parameters.WARPS]
choices = [2, 4, 8]
default = 4
[parameters.STAGES]
choices = [1, 2, 3]
default = 2
[parameters.FLAG]
choices = [false, true]
default = false
[parameters.MODE]
choices = ["a", "b"]
default = "a"
[[constraints]]
expr = "not FLAG or STAGES == 1"
why = "FLAG needs one stage"
[shapes.tiny]
dtype = "float32"
shapes = [{ N = 7, C = 9 }]
"""
SHAPE = {"N": 7, "C": 9}


def needle_space():  # noqa: ANN201
    return parse_space(SPACE, "test-space", name="fake", shape_keys=("N", "C"))


def needle(c: dict) -> float | str:
    """Smooth around the default (its best config without FLAG), one stage 30% slower; FLAG, which
    needs one stage, takes 25% off: the best config is the default with FLAG and one stage, which no
    one-parameter move from the default reaches. BT 64 with 8 warps fails."""
    if c["BT"] == 64 and c["WARPS"] == 8:
        return "illegal_memory"
    t = {16: 1.2, 32: 1.0, 64: 1.1}[c["BT"]] * {2: 1.15, 4: 1.0, 8: 1.05}[c["WARPS"]]
    t *= 1.1 if c["MODE"] == "b" else 1.0
    return t * (0.75 if c["FLAG"] else {1: 1.3, 2: 1.0, 3: 1.05}[c["STAGES"]])


@pytest.fixture(scope="module")
def land() -> Landscape:
    return Landscape.from_function(FAKE, needle_space(), SHAPE, "float32", needle)


def test_an_exhaustive_replay_measures_every_config_once_and_names_the_best(land: Landscape) -> None:
    n = len(land.results)
    run = replay(land, "grid", seed=0, trials=n)
    assert run.trials == n and len({canonical(c) for c, _, _ in run.measured}) == n
    assert run.winner == land.best_config and run.ratio == 1.0
    assert sum(s == "illegal_memory" for _, s, _ in run.measured) == sum(
        r["status"] != "ok" for r in land.results.values()) == 8


@pytest.mark.parametrize("sampler", ["pattern", "tpe", "random"])
def test_a_replay_keeps_the_budget_and_repeats_per_seed(land: Landscape, sampler: str) -> None:
    budget = len(land.results) // 5
    a, b = (replay(land, sampler, seed=3, trials=budget) for _ in range(2))
    assert a.trials == budget and len(a.measured) == budget
    assert [(canonical(c), s) for c, s, _ in a.measured] == [(canonical(c), s) for c, s, _ in b.measured]
    assert a.measured[0][0] == needle_space().default_config()  # every sampler measures the default first


def test_the_learning_samplers_ask_a_few_configs_at_a_time(land: Landscape) -> None:
    """With 16 compile workers and 11 trials, random search asks for all of them in one batch; pattern
    search and TPE ask at most 2 at a time (a quarter of the trials): a pattern search asked for 11
    configs at once ranks them before any result is in (session 10's H200 studies measured the
    default's neighbourhood blind)."""
    for sampler in ("pattern", "tpe"):
        run = replay(land, sampler, seed=0, trials=11, workers=16)
        assert run.batches and max(run.batches) <= 2, (sampler, run.batches)
    run = replay(land, "random", seed=0, trials=11, workers=16)
    assert max(run.batches) >= 10, run.batches


def test_the_pattern_search_finds_the_needle_behind_the_constraint_through_the_driver(land: Landscape) -> None:
    budget = len(land.results) // 5  # 20% of the space
    for seed in range(3):
        run = replay(land, "pattern", seed, budget)
        assert run.ratio == 1.0 and run.winner["FLAG"] and run.winner["STAGES"] == 1, (seed, run.winner)


def test_a_partial_landscape_is_searched_on_its_recorded_configs_only(land: Landscape) -> None:
    kept = {k: r for i, (k, r) in enumerate(sorted(land.results.items())) if i % 2 == 0 or not i}
    default = canonical(needle_space().default_config())
    kept[default] = land.results[default]
    part = Landscape(FAKE, SHAPE, "float32", restricted(land.space, set(kept)), kept, complete=False)
    for sampler in ("pattern", "tpe"):
        run = replay(part, sampler, seed=1, trials=12)
        assert run.trials == 12 and all(canonical(c) in kept for c, _, _ in run.measured)
        assert math.isfinite(run.winner_ms) and run.best_ms == min(
            r["time_ms"] for r in kept.values() if r["status"] == "ok")
