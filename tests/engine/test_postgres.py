"""Two search processes share one study on a real PostgreSQL server (started here, on loopback).

Needs Debian's PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb, pg_ctl; package
``postgresql``) and ``psycopg2``; skipped otherwise, except under CI=1 (set by .ci/run, which
installs both), where a missing one fails. As root, the server runs as the ``postgres``
user (initdb refuses root).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import optuna
import pytest

from momtune.space import canonical

from tests.helpers import missing

from .conftest import ROOT, SLOW, SPACES, cli_env, momtune_cmd, run_cli

pytestmark = pytest.mark.postgres


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _missing(why: str) -> None:
    """CI installs PostgreSQL (.ci/run), so there a missing server is a failure, not a skip."""
    missing(why, ".ci/run should have installed it")


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        _missing("postgres not installed (apt-get install postgresql)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _missing("psycopg2 not installed (pip install psycopg2-binary; `make setup` installs it)")
    bindir = os.path.dirname(bins[-1])
    prefix: list[str] = []
    root = tempfile.mkdtemp(prefix="momtune-pg-")
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            _missing("postgres not installed (no 'postgres' user)")
        os.chmod(root, 0o755)
        os.chown(root, user.pw_uid, user.pw_gid)
        runuser = shutil.which("runuser")
        prefix = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
    data, log, port = os.path.join(root, "data"), os.path.join(root, "server.log"), _free_port()

    def as_server(*cmd: str) -> subprocess.CompletedProcess[str]:
        full = [*prefix, *cmd] if prefix[:1] != ["su"] else [*prefix, " ".join(cmd)]
        return subprocess.run(full, capture_output=True, text=True, timeout=120, cwd=root)

    res = as_server(f"{bindir}/initdb", "-D", data, "-U", "momtune", "-A", "trust", "--no-sync")
    assert res.returncode == 0, res.stdout + res.stderr
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    res = as_server(f"{bindir}/pg_ctl", "-D", data, "-l", log, "-o", opts, "-w", "-t", "60", "start")
    assert res.returncode == 0, res.stdout + res.stderr + (open(log).read() if os.path.exists(log) else "")
    try:
        yield f"postgresql+psycopg2://momtune@127.0.0.1:{port}/postgres"
    finally:
        as_server(f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_processes_share_one_study(postgres_url: str) -> None:
    from momtune.study import open_storage

    open_storage(postgres_url)  # create the tables once, before the two workers race for them
    trials = 8  # the whole space of `slow` (4 BLOCK x 2 num_warps), enumerated by the grid sampler
    args = ["search", "--template", SLOW, "--shapes", "tiny", "--trials", str(trials), "--sampler", "grid",
            "--storage", postgres_url, "--space-dir", SPACES, "--heartbeat", "2", "--retime", "1", "--rounds", "1"]
    procs = [subprocess.Popen(momtune_cmd(*args, "--seed", str(i)), cwd=ROOT, env=cli_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    study = optuna.load_study(study_name="slow:interpreter:N7-C9-float32", storage=postgres_url)
    states = [t.state.name for t in study.trials]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert "RUNNING" not in states and "FAIL" not in states
    assert len(complete) == trials  # none lost
    configs = {canonical(t.params) for t in complete}
    assert len(configs) == trials  # none run twice: n distinct configs == n complete trials
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) == 2, f"both processes should have run trials: {workers}"
    assert study.user_attrs["winner"]["config"] in [t.params for t in complete]
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert all(t.user_attrs["status"] == "invalid_config" for t in pruned)  # a lost claim race, never run


def test_plain_postgresql_url_with_a_password_works_and_is_never_echoed(postgres_url: str, tmp_path) -> None:  # noqa: ANN001
    """The form the help shows (``postgresql://user:password@host/db``, no driver named) opens with
    the installed driver; a mistake in it is reported with the password hidden."""
    from momtune.study import open_storage

    plain = postgres_url.replace("postgresql+psycopg2://momtune@", "postgresql://momtune:s3cret@")
    assert plain.startswith("postgresql://momtune:s3cret@")
    storage = open_storage(plain)  # the server trusts loopback: the password is accepted, unused
    optuna.create_study(study_name="plain-url", storage=storage)
    assert "plain-url" in [s.study_name for s in optuna.get_all_study_summaries(storage=storage)]
    missing = plain.rsplit("/", 1)[0] + "/no_such_db"
    proc = run_cli("export", "--storage", missing, "--out", str(tmp_path / "lib.json"), timeout=120)
    assert proc.returncode != 0 and "no_such_db" in proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr and "momtune:***@" in proc.stderr
