"""``momtune search --devices``: one benchmark worker per device, all on the same studies through
the storage (issue 11, item 5). Without a GPU each listed device is an interpreter worker, which
tests the scheduling: both drive trials, no config runs twice, none is lost. (Not a multi-GPU
measurement: that needs a machine with several GPUs.)"""
from __future__ import annotations

import time

import optuna
import pytest

from momtune.cli import build_parser
from momtune.search import SearchOptions, search
from momtune.space import canonical

from .conftest import SLOW, SPACES


def test_two_devices_share_each_study_without_running_a_config_twice(storage: str) -> None:
    t0 = time.monotonic()
    results = search([SLOW], "tiny", SearchOptions(trials=8, sampler="grid", storage=storage, space_dir=SPACES,
                                                   heartbeat_s=2, retime=1, rounds=1, devices=[0, 1]))
    wall = time.monotonic() - t0
    [res] = results
    assert res.trials == 8 and res.winner is not None
    study = optuna.load_study(study_name=res.study, storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 8 and not [t for t in study.trials if t.state.name in ("RUNNING", "FAIL")]
    assert len({canonical(t.user_attrs["config"]) for t in complete}) == 8  # the whole space, each config once
    by_device: dict[str, int] = {}
    for t in complete:
        by_device[t.user_attrs["device"]] = by_device.get(t.user_attrs["device"], 0) + 1
    assert set(by_device) == {"momtune-bench-cpu0", "momtune-bench-cpu1"}, by_device
    assert min(by_device.values()) >= 2, by_device  # both carried a real share
    print(f"8 trials on 2 interpreter devices in {wall:.1f} s: {by_device}")


@pytest.mark.parametrize(("value", "parsed"), [("all", None), ("0", [0]), ("0,1", [0, 1]), ("3,1", [3, 1])])
def test_devices_flag_parses(value: str, parsed: list[int] | None) -> None:
    args = build_parser().parse_args(["search", "--template", "merge", "--shapes", "tiny", "--devices", value])
    assert args.devices == parsed


@pytest.mark.parametrize("value", ["-1", "0,0", "gpu0", ""])
def test_bad_devices_are_refused_at_parsing(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["search", "--template", "merge", "--shapes", "tiny", "--devices", value])
    assert exc.value.code == 2 and "argument --devices" in capsys.readouterr().err
