"""bench/gpu_backward.py (issue 14): its plumbing on the CPU in the interpreter (float32, 5 rows at
mom-340m's widths): every backward template passes the gate and gets a kernel and an autograd row."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_backward.py"
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU run needs the interpreter")


def test_cpu_run_checks_and_rows(tmp_path: Path) -> None:
    mod = load_script(SCRIPT)
    out = tmp_path / "b.json"
    assert mod.main(["--device", "cpu", "--rows", "5", "--presets", "mom-340m", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["failed"] == []
    got = [(r["op"], r["impl"], r["shape"]) for r in data["rows"]]
    assert got == [("norm_bwd", "kernel", {"N": 5, "D": 1024, "residual": 1}),
                   ("norm_bwd", "autograd", {"N": 5, "D": 1024, "residual": 1}),
                   ("swiglu_bwd", "kernel", {"N": 5, "I": 2048}), ("swiglu_bwd", "autograd", {"N": 5, "I": 2048})]
    assert all(r["floor_ms"] > 0 for r in data["rows"]) and data["rows"][0]["rel_err"] < 1e-6
