"""`momtune search` rejects bad flag values at parsing (exit 2, naming the flag, the value and
what is accepted) and creates no storage: before, --workers -1 spun forever, --trial-timeout -1
recorded every trial as a timeout, --timeout 0 meant none and -5 ran nothing, and --seed -1 or
--trial-timeout nan ended in tracebacks."""
from __future__ import annotations

import pytest

from momtune.cli import main

BAD = [
    ("--workers", "-1", "integer >= 1"),
    ("--workers", "0", "integer >= 1"),
    ("--trials", "0", "integer >= 1"),
    ("--trial-timeout", "-1", "seconds > 0"),
    ("--trial-timeout", "nan", "seconds > 0"),
    ("--trial-timeout", "inf", "seconds > 0"),
    ("--timeout", "0", "seconds > 0"),
    ("--timeout", "-5", "seconds > 0"),
    ("--timeout", "soon", "number of seconds"),
    ("--seed", "-1", "0 .. 4294967295"),
    ("--seed", "4294967296", "0 .. 4294967295"),
    ("--retime", "0", "integer >= 1"),
    ("--rounds", "0", "integer >= 1"),
    ("--heartbeat", "0", "integer >= 1"),
    ("--heartbeat", "1.5", "expected an integer"),
]


@pytest.mark.parametrize("flag,value,accepted", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_value_stops_at_parsing(flag, value, accepted, tmp_path, capsys):
    db = tmp_path / "s.db"
    with pytest.raises(SystemExit) as exc:
        main(["search", "--template", "merge", "--shapes", "tiny", "--storage", f"sqlite:///{db}", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and accepted in err and value in err, err
    assert not db.exists()


def test_good_values_parse():
    from momtune.cli import build_parser

    args = build_parser().parse_args(["search", "--template", "merge", "--shapes", "tiny", "--workers", "2",
                                      "--timeout", "0.5", "--trial-timeout", "30", "--seed", "4294967295",
                                      "--retime", "1", "--rounds", "1", "--heartbeat", "1"])
    assert (args.workers, args.timeout, args.trial_timeout, args.seed) == (2, 0.5, 30.0, 4294967295)


@pytest.mark.parametrize("argv,flag", [
    (["verify", "lib.json", "--trial-timeout", "-1"], "--trial-timeout"),
    (["verify", "lib.json", "--seed", "-3"], "--seed"),
    (["bench", "--batches", "0"], "--batches"),
    (["bench", "--layers", "-2"], "--layers"),
], ids=["verify-timeout", "verify-seed", "bench-batches", "bench-layers"])
def test_other_commands_check_their_numbers(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_bf16_shape_sets_are_refused_in_the_interpreter(tmp_path, monkeypatch, capsys):
    """Without a GPU the kernels run in Triton's interpreter, whose bf16 dots are wrong: a search of
    a bf16 shape set would check and tune garbage (issue 15, item 7). Refused before any worker
    starts or any storage is created."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    db = tmp_path / "s.db"
    code = main(["search", "--template", "recurrence", "--shapes", "mom-340m-prefill", "--trials", "1",
                 "--storage", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert code == 2 and "--shapes mom-340m-prefill" in err and "bfloat16" in err and "--shapes tiny" in err
    assert not db.exists()


def test_a_worker_in_the_interpreter_refuses_bf16_and_says_why():
    from momtune.worker import _handle

    reply = _handle({"op": "trial", "template": "merge", "shape": {"B": 1, "T": 4, "H": 2, "V": 8, "S": 1},
                     "dtype": "bfloat16", "config": {}, "seed": 0, "timing": {}}, "cpu", {})
    assert reply["status"] == "error" and "interpreter" in reply["reason"] and "not checked" in reply["reason"]


@pytest.mark.parametrize(("extra", "expected"), [
    ([], (20, None, "tpe")),
    (["--effort", "quick"], (40, 30.0, "pattern")),
    (["--effort", "full"], (400, 120.0, "pattern")),
    (["--effort", "quick", "--trials", "7", "--sampler", "random"], (7, 30.0, "random")),
    (["--effort", "full", "--timeout", "5"], (400, 5.0, "pattern")),
])
def test_effort_presets_and_explicit_flags_win(extra, expected):
    from momtune.cli import build_parser
    from momtune.commands.search import effort

    args = build_parser().parse_args(["search", "--template", "merge", "--shapes", "tiny", *extra])
    assert effort(args) == expected
