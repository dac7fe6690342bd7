"""A storage that refuses writes (disk full, read-only) is a StorageError naming the storage and
the database's own reason, not Optuna's traceback blaming "exceeding max length" (issue 15,
item 5)."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from momtune.errors import StorageError
from momtune.study import open_storage, storage_failure

from tests.helpers import missing

from .conftest import run_cli


def _full_sqlite_error(tmp_path: Path) -> tuple[str, BaseException]:
    url = f"sqlite:///{tmp_path}/full.db"
    storage = open_storage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    from sqlalchemy import event

    @event.listens_for(storage.engine, "connect")
    def _small(dbapi: object, _record: object) -> None:  # the database may not grow: a full disk
        dbapi.execute("PRAGMA max_page_count = 1")  # type: ignore[attr-defined]

    storage.engine.dispose()
    with pytest.raises(Exception) as e:
        study.set_user_attr("big", "x" * 1_000_000)
    return url, e.value


def test_a_full_database_names_the_storage_and_the_reason(tmp_path: Path) -> None:
    url, exc = _full_sqlite_error(tmp_path)
    assert type(exc).__name__ == "StorageInternalError" and "max length" in str(exc)  # Optuna's own words
    err = storage_failure(url, exc)
    assert isinstance(err, StorageError)
    assert str(tmp_path / "full.db") in str(err) and "database or disk is full" in str(err)
    assert "max length" not in str(err) and "free space" in str(err)


def test_other_errors_are_not_storage_failures() -> None:
    assert storage_failure("sqlite:///x.db", ValueError("bad config")) is None
    try:
        try:
            raise KeyError("k")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as exc:
        assert storage_failure("sqlite:///x.db", exc) is None


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs root with mount rights, as on the CI machine and here). Under CI=1
    (.ci/run) a machine that cannot mount one fails the test instead of skipping it, as for
    PostgreSQL: the full and read-only disk cases must run in CI."""
    where = tmp_path / "disk"
    where.mkdir()

    if os.geteuid() != 0 or not shutil.which("mount"):
        missing("mounting a small tmpfs needs root", "CI must run the full and read-only disk cases")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        missing(f"cannot mount a tmpfs here: {res.stderr.strip()}", "CI must run the full and read-only disk cases")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def test_search_on_a_full_then_read_only_disk_says_so(small_disk: Path) -> None:
    url = f"sqlite:///{small_disk}/s.db"
    args = ["search", "--template", "routing", "--shapes", "tiny", "--trials", "1", "--storage", url]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    fd = os.open(small_disk / "fill", os.O_WRONLY | os.O_CREAT)  # the rest of the disk
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    full = run_cli(*args[:-3], "3", "--storage", url)
    assert full.returncode != 0 and "Traceback" not in full.stderr
    assert "database or disk is full" in full.stderr and str(small_disk / "s.db") in full.stderr
    (small_disk / "fill").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    ro = run_cli(*args[:-3], "3", "--storage", url)
    assert ro.returncode != 0 and "Traceback" not in ro.stderr
    assert "readonly database" in ro.stderr and "writable" in ro.stderr
    kept = optuna.get_all_study_summaries(url, include_best_trial=False)
    assert sum(s.n_trials for s in kept) >= 3  # the first run's trials (one per tiny shape) are still there
