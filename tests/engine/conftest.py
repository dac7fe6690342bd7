"""Fixtures of the engine tests: fake templates (tests/engine/fake_template.py) and their search
spaces (tests/engine/spaces/), SQLite storages in tmp dirs, and a helper to run the CLI as a
subprocess.

On the CPU the fake kernels run in Triton's interpreter because `make test` sets TRITON_INTERPRET=1
before Python starts; nothing here sets it (a conftest that did would switch every GPU test of
the session into the interpreter)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPACES = str(Path(__file__).parent / "spaces")
FAKE = "tests.engine.fake_template:FAKE"
FAULTY = "tests.engine.fake_template:FAULTY"
SLOW = "tests.engine.fake_template:SLOW"
KILLER = "tests.engine.fake_template:KILLER"
RECORDER = "tests.engine.fake_template:RECORDER"


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TRITON_INTERPRET"] = "1"
    return env


def momtune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "momtune.cli", *args]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(momtune_cmd(*args), cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


@pytest.fixture(autouse=True)
def _pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    # spawned worker processes import the fake templates from the repo root
    monkeypatch.syspath_prepend(str(ROOT))
