"""The report folder: written whole into a new sibling folder, then swapped in.

``write_folder(out, build, force)`` calls ``build(tmp)`` on a fresh folder next to ``out``
(``<out>.momtune-tmp-<token>``), adds the manifest (``momtune-report.json``: every file written,
with its size and sha256), and swaps the folder in for ``out`` with one atomic exchange (Linux
``renameat2(RENAME_EXCHANGE)``; a plain rename when ``out`` does not exist yet). A kill at any
moment leaves ``out`` holding the old report or the new one, whole. The old report then sits at
the temporary name and is deleted.

Temporaries are recognisable by name and locked (``flock``) while their run is alive, so the
next run deletes those of a killed run (and, where the exchange is not available and a run was
killed between its two renames, puts the old report back first).

A folder holding anything the manifest does not list (or a listed file changed since) was not
written by momtune: replacing it needs ``force``. A folder of the reports written before the
manifest existed (``report.md``, ``report.html``, figure PNGs) counts as momtune's.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from momtune.errors import ReportError

MANIFEST = "momtune-report.json"
SCHEMA = "momtune.report/1"
TMP_MARK = ".momtune-tmp-"
OLD_SUFFIX = "-old"
LEGACY_FILES = ("report.md", "report.html")
FIGURE_PREFIXES = ("kernels_", "convergence_", "importance_", "end_to_end")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def foreign_files(out: Path) -> list[str]:
    """What in ``out`` momtune did not write (names, with why for a changed file); [] if none."""
    if not out.is_dir():
        return []
    listed: dict[str, Any] | None = None
    try:
        data = json.loads((out / MANIFEST).read_text())
        if isinstance(data, dict) and data.get("schema") == SCHEMA and isinstance(data.get("files"), dict):
            listed = data["files"]
    except (OSError, ValueError):
        listed = None
    alien = []
    for p in sorted(out.iterdir()):
        name = p.name
        if name == MANIFEST and listed is not None:
            continue
        if p.is_symlink() or not p.is_file():
            alien.append(f"{name}{'/' if p.is_dir() else ''}")
        elif listed is None:
            if not (name in LEGACY_FILES or (name.endswith(".png") and name.startswith(FIGURE_PREFIXES))):
                alien.append(name)
        elif name not in listed:
            alien.append(name)
        elif not isinstance(listed[name], dict) or listed[name].get("sha256") != _sha256(p):
            alien.append(f"{name} (changed since momtune wrote it)")
    return alien


def _locked(path: Path) -> int | None:
    """An fd holding an exclusive lock on folder ``path``, or None if a live process holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def clean_stale(out: Path) -> None:
    """Delete the temporaries of killed runs next to ``out``; if ``out`` is missing and a killed run
    left the old report aside (no atomic exchange here), put it back first."""
    for p in sorted(out.parent.glob(f"{out.name}{TMP_MARK}*")):
        if p.is_symlink() or not p.is_dir():
            continue
        try:
            fd = _locked(p)
        except OSError:
            continue
        if fd is None:  # a live run's
            continue
        try:
            if p.name.endswith(OLD_SUFFIX) and not out.exists():
                os.rename(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _mode_for(out: Path) -> int:
    try:
        return out.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o777 & ~umask


def write_folder(out: Path, build: Callable[[Path], Sequence[str]], force: bool = False,
                 manifest: dict[str, Any] | None = None) -> list[str]:
    """Build a report into a new folder and swap it in for ``out`` (see the module doc); returns the
    names ``build`` wrote. Refused (ReportError, nothing touched) when ``out`` is a file or, unless
    ``force``, holds files momtune did not write. On any error the old ``out`` stays as it was."""
    if out.is_symlink():  # write where it points; swapping would replace the link itself
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a folder; give a folder for the report")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
    except OSError as exc:
        raise ReportError(f"--out {out}: cannot create or use its parent folder ({exc.strerror or exc})") from None
    if not force:
        alien = foreign_files(out)
        if alien:
            shown = ", ".join(alien[:5]) + (f" and {len(alien) - 5} more" if len(alien) > 5 else "")
            raise ReportError(f"--out {out}: holds files momtune did not write ({shown}); a report replaces the "
                              "whole folder: give --force to replace it (those files are deleted), or choose "
                              "another --out")
    tmp = parent / f"{out.name}{TMP_MARK}{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        fd = _locked(tmp)
    except OSError as exc:
        raise ReportError(f"--out {out}: cannot create a folder next to it ({exc.strerror or exc})") from None
    try:
        names = list(build(tmp))
        files = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in names}
        (tmp / MANIFEST).write_text(json.dumps({"schema": SCHEMA, **(manifest or {}), "files": files}, indent=1)
                                    + "\n")
        for n in [*names, MANIFEST]:
            _fsync(tmp / n)
        os.chmod(tmp, _mode_for(out))
        _fsync(tmp)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)
    _fsync(parent)
    return names


def _swap(new: Path, out: Path) -> None:
    """Put folder ``new`` at ``out``; the old ``out`` (if any) is deleted after."""
    try:
        if not out.exists():
            os.rename(new, out)
            return
        if _exchange(new, out):
            shutil.rmtree(new, ignore_errors=True)  # the old report, now at the temporary name
            return
        old = new.with_name(new.name + OLD_SUFFIX)  # no atomic exchange here: two renames
        os.rename(out, old)
        try:
            os.rename(new, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise ReportError(f"--out {out}: cannot put the new report in place ({exc.strerror or exc}); the old "
                          "one is unchanged") from None
