"""Storage URLs (issue 15, item 5): ``postgresql://`` works with whichever PostgreSQL driver is
installed, and a password in a URL never appears in a message."""
from __future__ import annotations

import importlib.util

import pytest

from momtune.errors import StorageError
from momtune.study import open_storage, safe_url, scrub, with_driver

from .conftest import run_cli


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://alice:s3cret@db.example:5432/tune", "postgresql://alice:***@db.example:5432/tune"),
    ("postgresql+psycopg2://alice:p%40ss@host/tune", "postgresql+psycopg2://alice:***@host/tune"),
    ("mysql://bob:x@host/db?charset=utf8", "mysql://bob:***@host/db?charset=utf8"),
    ("postgresql://alice@host/tune", "postgresql://alice@host/tune"),
    ("sqlite:////tmp/a:b@c.db", "sqlite:////tmp/a:b@c.db"),
])
def test_safe_url_hides_only_the_password(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_scrub_removes_the_password_raw_and_percent_decoded() -> None:
    url = "postgresql://alice:p%40ss@host/tune"
    assert scrub('FATAL: bad "p@ss" and p%40ss', url) == 'FATAL: bad "***" and ***'


def test_postgresql_url_gets_an_installed_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    installed = {"psycopg"}  # psycopg 3 only: SQLAlchemy's default (psycopg2) would fail

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: real("json") if name in installed else
                        (None if name in ("psycopg2", "psycopg", "pg8000") else real(name, *a)))
    assert with_driver("postgresql://a:b@h/d") == "postgresql+psycopg://a:b@h/d"
    assert with_driver("postgres://h/d") == "postgresql+psycopg://h/d"
    assert with_driver("postgresql+pg8000://h/d") == "postgresql+pg8000://h/d"  # a named driver stays
    assert with_driver("sqlite:///x.db") == "sqlite:///x.db"
    installed.clear()
    with pytest.raises(StorageError, match=r"no PostgreSQL driver is installed.*momtune\[postgres\]") as e:
        with_driver("postgresql://alice:s3cret@h/d")
    assert "s3cret" not in str(e.value) and "alice:***@h/d" in str(e.value)


def test_an_unreachable_server_error_names_the_url_without_its_password() -> None:
    with pytest.raises(StorageError) as e:
        open_storage("postgresql://alice:s3cret@127.0.0.1:1/tune", read_only=True)
    assert "s3cret" not in str(e.value) and "postgresql://alice:***@127.0.0.1:1/tune" in str(e.value)


@pytest.mark.parametrize("command", ["export", "report", "search"])
def test_cli_never_prints_the_password(command: str, tmp_path) -> None:  # noqa: ANN001
    url = "postgresql://alice:s3cret@127.0.0.1:1/tune"
    args = {"export": ["export", "--storage", url, "--out", str(tmp_path / "lib.json")],
            "report": ["report", "--storage", url, "--out", str(tmp_path / "rep")],
            "search": ["search", "--template", "routing", "--shapes", "tiny", "--trials", "1", "--storage", url]}
    proc = run_cli(*args[command], timeout=120)
    assert proc.returncode != 0
    assert "s3cret" not in proc.stdout + proc.stderr
    assert "alice:***@" in proc.stdout + proc.stderr
