"""bench/gpu_projection.py (issue 12, item 3): the routed projection's arithmetic, checked on the
CPU in the interpreter (float32, tiny preset); its timings are for the GPU."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_projection.py"
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU run needs the interpreter")


def _load():
    return load_script(SCRIPT)


ARGS = ["--device", "cpu", "--preset", "tiny", "--shapes", "2x33", "3x7", "--dtype", "float32"]


def test_routed_rows_equal_the_full_projection_of_their_slot(tmp_path: Path) -> None:
    import json

    out = tmp_path / "p.json"
    assert _load().main(ARGS + ["--out", str(out)]) == 0
    checks = [r["check"] for r in json.loads(out.read_text())["rows"] if "check" in r]
    assert len(checks) == 2 and all(c["ok"] and c["err_routed"] < 1e-6 for c in checks)


def test_rows_left_in_slot_major_order_fail_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _load()
    monkeypatch.setattr(torch.Tensor, "index_copy_", lambda self, dim, index, src: self.copy_(src))
    assert mod.main(ARGS) == 1
