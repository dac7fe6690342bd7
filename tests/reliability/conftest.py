"""The reliability suite's tally: every case's outcome is counted, and the counts are printed at
the end of the run (the numbers issue 15's closing note quotes):

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/reliability
"""
from __future__ import annotations

from collections import Counter
from typing import Any

OUTCOMES: Counter[str] = Counter()  # filled by the cases: clear_error, ok, traceback, silent_wrong, data_loss, ...
BAD = ("traceback", "silent_wrong", "data_loss", "unclear_error", "ran_code")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not OUTCOMES:
        return
    total = sum(OUTCOMES.values())
    bad = ", ".join(f"{k.replace('_', ' ')} {OUTCOMES.get(k, 0)}" for k in BAD)
    terminalreporter.write_line(f"reliability: {total} hostile or careless inputs: {OUTCOMES.get('clear_error', 0)} "
                                f"clear errors, {OUTCOMES.get('ok', 0)} handled correctly; {bad}")
