"""The report folder (issue 15): built whole next to --out and swapped in, a manifest of momtune's
files, --force for a folder holding anything else, and kills at every stage leave the old report
or the new one, whole, with no temporaries after the next run."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from momtune.errors import ReportError
from momtune.report import build_report
from momtune.report.folder import MANIFEST, TMP_MARK, clean_stale

from .conftest import Stored

ROOT = Path(__file__).resolve().parents[2]


def _report(out: Path, stored: Stored, title: str | None = None, force: bool = False) -> None:
    build_report(out, storage=None, benches=[stored.bench], title=title, force=force)


def _whole(out: Path) -> str:
    """The report in ``out`` is complete (every file its manifest lists, unchanged); its title."""
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) | {MANIFEST} == {p.name for p in out.iterdir()}
    for name, meta in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == meta["sha256"], name
    return (out / "report.md").read_text(encoding="utf-8").splitlines()[0]


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_the_manifest_lists_every_file_and_a_rerun_replaces_the_report(stored: Stored, tmp_path: Path) -> None:
    out = tmp_path / "r"
    _report(out, stored, "first")
    assert _whole(out) == "# first"
    (out.parent / "keep.txt").write_text("a sibling is not touched")
    _report(out, stored, "second")
    assert _whole(out) == "# second"
    assert _siblings(out) == ["keep.txt"]


def test_a_folder_of_other_files_needs_force(stored: Stored, tmp_path: Path) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.md").write_text("my own notes\n")
    with pytest.raises(ReportError, match=r"--out .*notes: holds files momtune did not write \(notes.md\).*--force"):
        _report(out, stored)
    assert [p.name for p in out.iterdir()] == ["notes.md"] and _siblings(out) == []
    _report(out, stored, "forced", force=True)
    assert _whole(out) == "# forced" and not (out / "notes.md").exists()


def test_a_report_file_changed_by_hand_or_a_subfolder_is_not_momtunes(stored: Stored, tmp_path: Path) -> None:
    out = tmp_path / "r"
    _report(out, stored)
    (out / "report.md").write_text("# my edited report\n")
    with pytest.raises(ReportError, match=r"report.md \(changed since momtune wrote it\)"):
        _report(out, stored)
    assert (out / "report.md").read_text() == "# my edited report\n"
    (out / "report.md").unlink()
    (out / "data").mkdir()
    with pytest.raises(ReportError, match=r"\(data/\)"):
        _report(out, stored)


def test_a_report_written_before_the_manifest_counts_as_momtunes(stored: Stored, tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    for name in ("report.md", "report.html", "convergence_merge.png", "importance_merge.png"):
        (out / name).write_text("old")
    _report(out, stored, "new")
    assert _whole(out) == "# new" and not (out / "convergence_merge.png").exists()


def test_out_holding_an_input_or_the_working_folder_is_refused_even_with_force(
        stored: Stored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ReportError, match=r"holds --bench .*bench.json"):
        build_report(stored.root, storage=None, benches=[stored.bench], force=True)
    assert (stored.root / "bench.json").is_file()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(ReportError, match="is the working folder or holds it"):
        build_report(".", storage=None, benches=[stored.bench], force=True)
    assert (tmp_path / "mine.txt").read_text() == "x"


@pytest.mark.parametrize("stage", ["manifest", "swap"])
def test_a_failure_while_finishing_leaves_the_old_report(stored: Stored, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    out = tmp_path / "r"
    _report(out, stored, "old")
    if stage == "manifest":  # the manifest is written last: a disk that fills up there
        real = json.dumps

        def full(obj: object, **kw: object) -> str:
            if isinstance(obj, dict) and "files" in obj:
                raise OSError(28, "No space left on device")
            return real(obj, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr("momtune.report.folder.json.dumps", full)
        with pytest.raises(OSError, match="No space left"):
            _report(out, stored, "new")
    else:
        def refuse(*args: object) -> bool:
            raise OSError(13, "Permission denied")

        monkeypatch.setattr("momtune.report.folder._exchange", refuse)
        with pytest.raises(ReportError, match="cannot put the new report in place.*old one is unchanged"):
            _report(out, stored, "new")
    assert _whole(out) == "# old" and _siblings(out) == []


def test_without_an_atomic_exchange_two_renames_still_swap(stored: Stored, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r"
    _report(out, stored, "old")
    monkeypatch.setattr("momtune.report.folder._exchange", lambda a, b: False)
    _report(out, stored, "new")
    assert _whole(out) == "# new" and _siblings(out) == []


KILLER = """
import os, signal, sys
from pathlib import Path
import momtune.report.folder as folder
from momtune.report import build_report

stage, out, bench = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if stage == "build":  # the figures and report.md written, report.html not yet
    import momtune.report.render as render
    render.to_html = die
elif stage == "before-swap":  # the new folder whole, with its manifest
    folder._swap = die
elif stage == "after-exchange":  # swapped: the old report waits at the temporary name
    real = folder._exchange
    folder._exchange = lambda a, b: real(a, b) and die()
elif stage == "between-renames":  # no atomic exchange: killed with the old report moved aside
    folder._exchange = lambda a, b: False
    real_rename = os.rename
    def rename(a, b):
        real_rename(a, b)
        if str(a) == str(out):
            die()
    folder.os.rename = rename
build_report(out, storage=None, benches=[bench], title="new")
"""


@pytest.mark.parametrize("stage", ["build", "before-swap", "after-exchange", "between-renames"])
def test_a_kill_at_any_stage_leaves_a_whole_report_and_the_next_run_cleans_up(
        stored: Stored, tmp_path: Path, stage: str) -> None:
    out = tmp_path / "r"
    _report(out, stored, "old")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLER, stage, str(out), str(stored.bench)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = _siblings(out)
    if stage == "between-renames":  # the one moment a plain rename leaves no --out: the old report aside
        assert not out.exists() and any(n.endswith("-old") for n in left)
        clean_stale(out)  # what the next run does first: the old report is put back
        assert _whole(out) == "# old"
    else:
        assert _whole(out) == ("# new" if stage == "after-exchange" else "# old")
        assert left and all(n.startswith(f"r{TMP_MARK}") for n in left), left  # recognisable, not hidden
    _report(out, stored, "next")
    assert _whole(out) == "# next" and _siblings(out) == [], "temporaries of the killed run left behind"


def test_a_live_runs_temporary_is_not_removed(tmp_path: Path) -> None:
    out = tmp_path / "r"
    busy = tmp_path / f"r{TMP_MARK}0123abcd"
    busy.mkdir()
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running report holds its folder
    try:
        clean_stale(out)
        assert busy.is_dir()
    finally:
        os.close(fd)
    clean_stale(out)
    assert not busy.exists()


def test_cli_force(stored: Stored, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from momtune.cli import main

    out = tmp_path / "rep"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    argv = ["report", "--bench", str(stored.bench), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "notes.md" in err and "--force" in err and "Traceback" not in err
    assert (out / "notes.md").read_text() == "mine"
    assert main([*argv, "--force"]) == 0
    assert not (out / "notes.md").exists() and (out / MANIFEST).is_file()
