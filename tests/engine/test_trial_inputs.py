"""What a trial costs besides its kernel: the float64 references of the few input sets a study's
trials are checked on are computed once per worker (momtune.worker.ReferenceCache), never reused
for other inputs, and --timeout holds to within one trial (momtune.search)."""
from __future__ import annotations

import dataclasses
import time

import optuna
import pytest
import torch

from momtune import worker
from momtune.search import INPUT_SETS, SearchOptions, search, trial_seed
from momtune.study import count, is_done, trials_of
from momtune.timing import TimingOptions

from .conftest import SLOW, SPACES
from .fake_template import FAKE, FAULTY, make_inputs


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> worker.ReferenceCache:
    cache = worker.ReferenceCache()
    monkeypatch.setattr(worker, "_REFERENCES", cache)
    return cache


def counting(template, calls: list[int]):
    def reference(inputs, **kw):
        calls.append(1)
        return template.reference(inputs, **kw)

    return dataclasses.replace(template, reference=reference)


def trial(template, seed: int, config=None) -> dict:
    opts = TimingOptions(interpreter=True, runs=2)
    req = {"template": template, "dtype": "float32", "shape": {"N": 7, "C": 9}, "op": "trial",
           "config": config or dict(template.default_config), "seed": seed, "timing": dataclasses.asdict(opts)}
    return worker._handle(req, "cpu", {})


def test_each_input_sets_reference_is_computed_once_per_worker(fresh_cache) -> None:
    calls: list[int] = []
    t = counting(FAKE, calls)
    for _ in range(3):
        assert trial(t, 5)["status"] == "ok"
    assert len(calls) == 2, "check run (seed 5) and after timing (seed 6): two references, once each"
    assert fresh_cache.hits == 4 and fresh_cache.misses == 2
    assert trial(t, 11)["status"] == "ok"
    assert len(calls) == 4  # another input set: computed


def test_inputs_that_do_not_match_their_seed_are_never_checked_against_a_cached_reference() -> None:
    """A template whose inputs change from call to call (not reproducible from the seed): every
    trial computes its references; a cached answer for other inputs would pass a wrong kernel or
    fail a right one."""
    calls: list[int] = []
    drift = iter(range(1000))

    def unseeded(shape, dtype, device, seed):
        return make_inputs(shape, dtype, device, seed + 1000 * next(drift))

    t = counting(dataclasses.replace(FAKE, make_inputs=unseeded), calls)
    for _ in range(3):
        assert trial(t, 5)["status"] == "ok"
    assert len(calls) == 6


def test_a_wrong_kernel_is_rejected_with_the_cached_reference() -> None:
    assert trial(FAULTY, 5)["status"] == "ok"  # fills the cache for (faulty, shape, seed 5 and 6)
    for fault, kind in (("wrong", "norm"), ("unwritten", "unwritten")):
        reply = trial(FAULTY, 5, {**FAULTY.default_config, "FAULT": fault})
        assert reply["status"] == "wrong_answer" and reply["check"] == kind, reply
    assert worker._REFERENCES.hits >= 2


def test_the_cache_holds_at_most_its_entries_and_bytes() -> None:
    calls: list[int] = []
    t = counting(FAKE, calls)
    inputs = make_inputs({"N": 7, "C": 9}, torch.float32, "cpu", 5)
    cache = worker.ReferenceCache(entries=2)
    for k in range(3):
        cache.reference(t, inputs, k, "cpu")
    assert list(cache.items) == [1, 2]
    small = worker.ReferenceCache(entries=8, max_fraction=0.2)
    small.reference(t, inputs, "big", "cpu")
    other = make_inputs({"N": 7, "C": 9}, torch.float32, "cpu", 6)
    n = len(calls)
    small.reference(t, other, "big", "cpu")
    assert len(calls) == n + 1  # another fingerprint: a miss
    assert small.reference(t, other, "big", "cpu").ref is not None and len(calls) == n + 1


def test_trials_alternate_between_a_few_input_sets() -> None:
    seeds = [trial_seed(3, n) for n in range(2 * INPUT_SETS)]
    assert len(set(seeds)) == INPUT_SETS == 2
    assert seeds[0] == seeds[INPUT_SETS] and seeds[0] != seeds[1]
    assert not {s + 1 for s in seeds} & set(seeds)  # after-timing inputs are no check-run inputs
    assert trial_seed(4, 0) != trial_seed(3, 0)


def test_timeout_holds_to_one_trial_and_the_trials_it_cut_run_later(storage: str) -> None:
    """A batch of 4 compiled configs of a template whose trials take ~1 s: with --timeout 1 the
    first result is kept, the configs whose turn came after the deadline are told as not run (no
    result, free again) except the default, and a later search without a time limit measures them."""
    opts = SearchOptions(trials=8, sampler="grid", storage=storage, space_dir=SPACES, timeout_s=1.0,
                         retime=1, rounds=1, workers=4)
    t0 = time.monotonic()
    [res] = search([SLOW], "tiny", opts)
    study = optuna.load_study(study_name=res.study, storage=storage)
    trials = trials_of(study)
    not_run = [t for t in trials if t.user_attrs.get("reason", "").startswith("not run:")]
    c = count(trials)
    assert res.stopped == "timeout"
    assert 1 <= c.done < 4 and c.ok == c.done, c
    assert not_run and all(t.state.name == "FAIL" and not is_done(t) and "status" not in t.user_attrs
                           for t in not_run)
    assert time.monotonic() - t0 < 60
    # the default runs whenever its compile is done: the winner is judged against it
    default = study.user_attrs["default_config"]
    assert study.user_attrs["default_valid"] is True
    assert any(t.user_attrs.get("config") == default and t.user_attrs.get("status") == "ok" for t in trials)
    [res2] = search([SLOW], "tiny", dataclasses.replace(opts, timeout_s=None))
    c2 = count(trials_of(optuna.load_study(study_name=res2.study, storage=storage)))
    assert c2.done == 8 and c2.ok == 8 and len(c2.measured) == 8


def test_a_reference_output_that_is_an_input_is_held_as_a_copy() -> None:
    """A reference passing an input through (a state, say) must not change when the launch or the
    next trial's inputs overwrite that input."""
    t = dataclasses.replace(FAKE, reference=lambda inputs: {"y": inputs["x"]})
    inputs = make_inputs({"N": 7, "C": 9}, torch.float32, "cpu", 5)
    ref = worker.ReferenceCache().reference(t, inputs, ("k", 5), "cpu").ref
    before = ref["y"].clone()
    inputs["x"].fill_(7.0)
    assert torch.equal(ref["y"], before)
