"""momtune.winner.choose_winner: re-timed candidates, and a win within noise of the default is no win."""
from __future__ import annotations

from types import SimpleNamespace

from momtune.timing import Timing
from momtune.winner import choose_winner

DEFAULT = {"BLOCK": 32}


def _trial(block: int, ms: float):
    return SimpleNamespace(state=SimpleNamespace(name="COMPLETE"), value=ms,
                           user_attrs={"status": "ok", "config": {"BLOCK": block}})


def _retimer(times: dict[int, tuple[float, float]]):
    def retime(configs):
        return [Timing(times[c["BLOCK"]][0], times[c["BLOCK"]][1], 10) for c in configs]
    return retime


TRIALS = [_trial(32, 1.0), _trial(64, 0.9), _trial(128, 0.95)]


def test_a_clear_win_is_taken():
    winner, default_ms = choose_winner(TRIALS, DEFAULT, 2, 3, _retimer({32: (1.0, 0.01), 64: (0.80, 0.01),
                                                                         128: (0.95, 0.01)}))
    assert winner["config"] == {"BLOCK": 64} and winner["default_kept"] is None and default_ms == 1.0
    assert [c["spread"] for c in winner["candidates"]] == [0.01, 0.01, 0.01]


def test_a_win_within_the_spread_keeps_the_default():
    winner, _ = choose_winner(TRIALS, DEFAULT, 2, 3, _retimer({32: (1.0, 0.06), 64: (0.96, 0.01),
                                                                128: (0.99, 0.01)}))
    assert winner["config"] == DEFAULT and winner["time_ms"] == 1.0
    assert winner["default_kept"] == {"config": {"BLOCK": 64}, "time_ms": 0.96, "spread": 0.01}


def test_a_win_under_the_noise_floor_keeps_the_default():
    winner, _ = choose_winner(TRIALS, DEFAULT, 2, 3, _retimer({32: (1.0, 0.0), 64: (0.99, 0.0), 128: (1.2, 0.0)}))
    assert winner["config"] == DEFAULT and winner["default_kept"]["config"] == {"BLOCK": 64}


def test_without_a_checked_default_the_best_config_wins():
    trials = [_trial(64, 0.9), _trial(128, 0.95)]  # the default never passed the check
    winner, _ = choose_winner(trials, DEFAULT, 2, 2, _retimer({32: (1.0, 0.0), 64: (0.99, 0.0), 128: (1.2, 0.0)}))
    assert winner["config"] == {"BLOCK": 64} and winner["default_kept"] is None
