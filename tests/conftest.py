"""Session-wide guard: a GPU-marked test never runs in Triton's interpreter.

`make test` (CPU) sets TRITON_INTERPRET=1 before Python starts and deselects the GPU tests;
`make test-gpu` runs them compiled. No conftest sets TRITON_INTERPRET: one that did (as
tests/engine's once did, at import) switched every GPU test of the session into the
interpreter, where they pass without compiling a kernel. This fixture fails such a test instead.
"""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _gpu_tests_run_compiled(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("gpu") is None:
        return
    from momtune.settings import interpreter_mode

    if interpreter_mode():
        pytest.fail("a GPU test is running in Triton's interpreter (TRITON_INTERPRET is set); "
                    "run GPU tests with `make test-gpu`, without TRITON_INTERPRET")
