"""Commands that only read studies (export, report) never write the storage: a mistyped SQLite
path is an error, not a new empty database, and a SQLite file that is not an Optuna storage is
refused without Optuna's tables being added to it (issue 15)."""
from __future__ import annotations

import sqlite3

import pytest

from momtune.cli import main


def _tables(path) -> list[str]:
    with sqlite3.connect(path) as con:
        return sorted(r[0] for r in con.execute("select name from sqlite_master where type = 'table'"))


@pytest.mark.parametrize("command", ["export", "report"])
def test_missing_sqlite_file_is_an_error_and_is_not_created(command, tmp_path, capsys):
    db = tmp_path / "typo.db"
    args = [command, "--storage", f"sqlite:///{db}", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not db.exists()


@pytest.mark.parametrize("command", ["export", "report"])
def test_foreign_sqlite_file_is_refused_untouched(command, tmp_path, capsys):
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as con:
        con.execute("create table notes (x text)")
    before = db.read_bytes()
    assert main([command, "--storage", f"sqlite:///{db}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "storage" in err and str(db) in err, err
    assert _tables(db) == ["notes"] and db.read_bytes() == before
