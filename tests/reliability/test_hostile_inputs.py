"""Hostile and careless inputs to every command, each judged the same way (issue 15, item 8).

A case runs ``momtune <argv>`` in-process, in a folder of its own that holds a real study
database (``s.db``) and the library exported from it (``lib.json``), and is classified:

- ``traceback``: an exception escaped the command (a user mistake must never show one);
- ``silent_wrong``: the command succeeded where it had to refuse, or its result is wrong;
- ``unclear_error``: it refused without naming what was wrong (the case's ``says``);
- ``data_loss``: a refusal changed or created a file, or a success changed a file it did not own;
- ``ran_code``: a file named a module, and momtune imported it;
- ``clear_error`` / ``ok``: what it must do.

Every case must end ``clear_error`` or ``ok``; conftest.py prints the tally.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from momtune.cli import main

from ..engine.conftest import FAKE, ROOT, SPACES
from .conftest import OUTCOMES

Check = Callable[[Path, str], None]


@dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]]
    says: str = ""  # an error must contain this (the argument or file it is about), case-insensitive
    ok: Check | None = None  # a case that must succeed: asserts its result
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    owned: tuple[str, ...] = ()  # files a success may write


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_file() and "__pycache__" not in p.parts:
            out[str(p.relative_to(folder))] = (p.read_bytes(), p.stat().st_mode)
    return out


def _library(d: Path) -> dict:
    return json.loads((d / "lib.json").read_text())


def _write_library(d: Path, edit: Callable[[dict], None], name: str = "lib.json") -> None:
    lib = _library(d)
    edit(lib)
    (d / name).write_text(json.dumps(lib, indent=1))


def _entry(lib: dict) -> dict:
    return lib["templates"]["fake"]["entries"][0]


def _plant_module(d: Path) -> None:
    """A module that leaves a mark when imported, named by a shared library."""
    (d / "evil_tmpl.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n"
                                    "T = None\n")

    def edit(lib: dict) -> None:
        lib["templates"]["fake"]["spec"] = "evil_tmpl:T"
        lib["templates"]["evil"] = {**lib["templates"]["fake"], "spec": "evil_tmpl:T"}
    _write_library(d, edit)


def _exported(d: Path, out: str) -> None:
    lib = json.loads((d / out).read_text())
    assert lib["templates"]["fake"]["entries"], "the export holds the searched entries"
    assert oct((d / out).stat().st_mode & 0o777) == oct(0o666 & ~_umask()), "written with the umask's mode"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _bad_constraint(d: Path) -> None:
    spaces = d / "spaces"
    shutil.copytree(SPACES, spaces)
    text = (spaces / "fake.toml").read_text()
    (spaces / "fake.toml").write_text(text + '\n[[constraints]]\nexpr = "BLOCK ** (BLOCK ** 99) > 0"\n'
                                             'why = "hostile"\n')


def _other_gpu_library(d: Path) -> None:
    def edit(lib: dict) -> None:
        lib["provenance"]["gpu"] = "NVIDIA H100 80GB HBM3"
        lib["provenance"]["triton"] = "3.1.0"
    _write_library(d, edit, "h100.json")


def _foreign_report_folder(d: Path) -> None:
    (d / "rep").mkdir()
    (d / "rep" / "notes.md").write_text("my own notes, not momtune's\n")


def _not_optuna_sqlite(d: Path) -> None:
    con = sqlite3.connect(d / "mine.sqlite")
    con.execute("create table t (x int)")
    con.commit()
    con.close()


SPEC = ["--template-spec", f"fake={FAKE}"]  # the fake template is not registered: named by the user
SEARCH = ["search", "--template", FAKE, "--shapes", "two", "--space-dir", SPACES]


def _search(*extra: str) -> Callable[[Path], list[str]]:
    return lambda d: [*SEARCH, "--storage", f"sqlite:///{d}/new.db", *extra]


CASES = [
    # ---- outputs never destroy what they did not make
    Case("export-out-is-its-database", lambda d: ["export", "--storage", f"sqlite:///{d}/s.db", "--out", f"{d}/s.db"],
         says="--out"),
    Case("export-out-is-a-folder", lambda d: ["export", "--storage", f"sqlite:///{d}/s.db", "--out", str(d)],
         says=str("folder")),
    Case("export-replaces-another-gpus-library",
         lambda d: ["export", "--storage", f"sqlite:///{d}/s.db", "--out", f"{d}/h100.json"],
         says="--force", setup=_other_gpu_library),
    Case("export-new-library", lambda d: ["export", "--storage", f"sqlite:///{d}/s.db", "--out", f"{d}/new.json"],
         ok=lambda d, out: _exported(d, "new.json"), owned=("new.json",)),
    Case("report-into-a-folder-of-other-files",
         lambda d: ["report", "--storage", f"sqlite:///{d}/s.db", "--out", f"{d}/rep"],
         says="--force", setup=_foreign_report_folder),
    Case("report-out-is-a-file", lambda d: ["report", "--storage", f"sqlite:///{d}/s.db", "--out", f"{d}/lib.json"],
         says="lib.json"),
    # ---- libraries are data
    Case("verify-library-naming-a-module", lambda d: ["verify", f"{d}/lib.json"], says="evil",
         setup=_plant_module),
    Case("report-library-naming-a-module",
         lambda d: ["report", "--library", f"{d}/lib.json", "--out", f"{d}/rep2"], setup=_plant_module,
         ok=lambda d, out: None, owned=("rep2",)),
    Case("verify-strict-without-source-hash", lambda d: ["verify", f"{d}/lib.json", "--policy", "strict", *SPEC],
         says="source_hash",
         setup=lambda d: _write_library(d, lambda lib: lib["templates"]["fake"].pop("source_hash"))),
    Case("verify-strict-without-a-provenance-field",
         lambda d: ["verify", f"{d}/lib.json", "--policy", "strict", *SPEC],
         says="triton", setup=lambda d: _write_library(d, lambda lib: lib["provenance"].pop("triton"))),
    Case("verify-empty-library", lambda d: ["verify", f"{d}/lib.json", *SPEC], says="no entries",
         setup=lambda d: _write_library(d, lambda lib: lib["templates"].clear())),
    Case("verify-mistyped-template-filter",
         lambda d: ["verify", f"{d}/lib.json", "--template", "recurence", *SPEC],
         says="recurence"),
    Case("verify-config-outside-the-space",
         lambda d: ["verify", f"{d}/lib.json", *SPEC], says="BLOCK=256",  # runs right, but was never searched
         setup=lambda d: _write_library(d, lambda lib: _entry(lib)["config"].update(BLOCK=256))),
    Case("verify-entry-with-a-mistyped-key",
         lambda d: ["verify", f"{d}/lib.json", "--policy", "strict", *SPEC],
         says="confg", setup=lambda d: _write_library(d, lambda lib: _entry(lib).update(confg={"BLOCK": 32}))),
    Case("verify-truncated-library", lambda d: ["verify", f"{d}/lib.json"], says="lib.json",
         setup=lambda d: (d / "lib.json").write_text((d / "lib.json").read_text()[:100])),
    Case("verify-library-is-a-list", lambda d: ["verify", f"{d}/lib.json"], says="lib.json",
         setup=lambda d: (d / "lib.json").write_text("[1, 2]")),
    Case("verify-missing-library", lambda d: ["verify", f"{d}/nope.json"], says="nope.json"),
    # ---- flags
    *[Case(f"search{flag}={value}", _search(flag, value), says=flag) for flag, value in [
        ("--workers", "-1"), ("--trials", "0"), ("--trial-timeout", "-1"), ("--trial-timeout", "nan"),
        ("--timeout", "0"), ("--timeout", "-5"), ("--seed", "-1"), ("--heartbeat", "0"), ("--retime", "0"),
        ("--rounds", "0"), ("--sampler", "cmaes")]],
    Case("search-unknown-template", lambda d: ["search", "--template", "recurence", "--shapes", "tiny",
                                              "--storage", f"sqlite:///{d}/new.db"], says="recurence"),
    Case("search-unknown-shape-set", lambda d: [*SEARCH[:4], "huge", "--space-dir", SPACES,
                                               "--storage", f"sqlite:///{d}/new.db"], says="huge"),
    Case("search-missing-space-dir", lambda d: [*SEARCH[:5], "--space-dir", f"{d}/nospaces", "--storage",
                                               f"sqlite:///{d}/n.db"],
         says="nospaces"),
    Case("search-constraint-of-unbounded-cost",
         lambda d: [*SEARCH[:5], "--space-dir", f"{d}/spaces", "--storage", f"sqlite:///{d}/new.db"],
         says="fake.toml",
         setup=_bad_constraint),
    Case("search-bf16-in-the-interpreter", lambda d: ["search", "--template", "recurrence", "--shapes",
                                                     "mom-340m-prefill", "--storage", f"sqlite:///{d}/new.db"],
         says="bfloat16"),
    Case("verify-negative-seed", lambda d: ["verify", f"{d}/lib.json", "--seed", "-3"], says="--seed"),
    Case("bench-zero-batch", lambda d: ["bench", "--batches", "0"], says="--batches"),
    # ---- read-only commands never create or change a database
    Case("export-mistyped-sqlite-path", lambda d: ["export", "--storage", f"sqlite:///{d}/s.bd", "--out",
                                                  f"{d}/x.json"], says="s.bd"),
    Case("report-mistyped-sqlite-path", lambda d: ["report", "--storage", f"sqlite:///{d}/s.bd", "--out",
                                                  f"{d}/rep"], says="s.bd"),
    Case("export-from-a-sqlite-file-that-is-not-a-study",
         lambda d: ["export", "--storage", f"sqlite:///{d}/mine.sqlite", "--out", f"{d}/x.json"],
         says="mine.sqlite", setup=_not_optuna_sqlite),
    Case("export-unknown-template", lambda d: ["export", "--storage", f"sqlite:///{d}/s.db", "--out", f"{d}/x.json",
                                              "--template", "nope"], says="nope"),
    # ---- storage URLs
    Case("export-postgres-password-not-echoed",
         lambda d: ["export", "--storage", "postgresql://alice:s3cret@127.0.0.1:1/db", "--out", f"{d}/x.json"],
         says="alice:***@"),
    # ---- environment
    Case("bad-policy-variable", lambda d: ["verify", f"{d}/lib.json", *SPEC], says="MOMTUNE_POLICY",
         env={"MOMTUNE_POLICY": "lenient"}),
]


@pytest.fixture(scope="module")
def studied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real study database of the fake template (two shapes) and the library exported from it."""
    from momtune.library import export_library
    from momtune.search import SearchOptions, search

    d = tmp_path_factory.mktemp("studied")
    search([FAKE], "two", SearchOptions(trials=2, sampler="grid", storage=f"sqlite:///{d}/s.db", space_dir=SPACES,
                                        retime=1, rounds=1))
    export_library(f"sqlite:///{d}/s.db", d / "lib.json", note=lambda m: None)
    return d


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, studied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "case"
    shutil.copytree(studied, d)
    if case.setup:
        case.setup(d)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(d)  # a module planted here is importable, as from a user's working directory
    monkeypatch.syspath_prepend(str(ROOT))
    before = _snapshot(d)
    out, err = io.StringIO(), io.StringIO()
    outcome, detail = "", ""
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(case.argv(d))
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # noqa: BLE001 - what the suite is looking for
        outcome, detail = "traceback", f"{type(exc).__name__}: {exc}"
        code = None
    text = out.getvalue() + err.getvalue()
    after = _snapshot(d)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not any(k == o or k.startswith(o + "/") for o in case.owned))
    if not outcome:
        if (d / "RAN").exists():
            outcome, detail = "ran_code", "a module named by a library was imported"
        elif changed:
            outcome, detail = "data_loss", f"changed or created: {changed}"
        elif case.ok is None and code == 0:
            outcome, detail = "silent_wrong", f"succeeded where it had to refuse: {text[-400:]}"
        elif case.ok is None and case.says.lower() not in text.lower():
            outcome, detail = "unclear_error", f"the error does not say {case.says!r}: {text[-400:]}"
        elif case.ok is not None:
            if code != 0:
                outcome, detail = "silent_wrong" if code is None else "unclear_error", f"exit {code}: {text[-400:]}"
            else:
                try:
                    case.ok(d, text)
                    outcome = "ok"
                except AssertionError as exc:
                    outcome, detail = "silent_wrong", str(exc)
        else:
            outcome = "clear_error"
    OUTCOMES[outcome] += 1
    if os.environ.get("MOMTUNE_RELIABILITY_SHOW"):  # what each case printed, to review the messages
        print(f"\n[{case.id}] {outcome}, exit {code}: {text.strip()[-300:]}")
    assert outcome in ("clear_error", "ok"), f"{outcome}: {detail}"
