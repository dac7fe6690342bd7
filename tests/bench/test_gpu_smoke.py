"""bench/gpu_smoke.py in tiny mode on the CPU (Triton interpreter): the whole run passes with a
row for every check, and a broken kernel, a skipped ``out=`` buffer or a divergent token makes it fail."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_smoke.py"
INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available() and not INTERP
needs_kernels = pytest.mark.skipif(not INTERP and not CUDA,
                                   reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (interpreter)")
DEVICE = "cuda" if CUDA else "cpu"


def _smoke():
    """The script as a module (bench/ is not a package)."""
    return load_script(SCRIPT)


def test_tiny_run_passes_with_a_row_per_check(tmp_path):
    from momtune.kernels import template_names

    smoke = _smoke()
    out = tmp_path / "smoke.json"
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("MOMTUNE_LIBRARY", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "INTERPRETER" in proc.stdout and "all checks passed" in proc.stdout
    data = json.loads(out.read_text())
    assert data["mode"] == "tiny" and data["interpreter"] and data["ok"]
    rows = {r["name"]: r for r in data["rows"]}
    expected = [f"template:{n}" for n in template_names()] + [smoke.LAYER_CHECK, *smoke.LM_CHECKS]
    assert sorted(rows) == sorted(expected)
    for name, row in rows.items():
        want = "SKIP" if name == "lm:fla-argmax" else "PASS"
        assert row["status"] == want, (name, row["detail"])
        if name.startswith("template:"):
            assert row["rel_norm"] is not None and row["rel_norm"] < 1e-5, (name, row["rel_norm"])
            assert row["extra"]["shape_set"] == "tiny"
    assert rows["lm:fp32-generate"]["extra"]["identical"]
    assert "tiny" in data["log"][0] and data["log"][-1].startswith("wrote")


def _norm_case():
    from momtune.kernels import get_template

    smoke = _smoke()
    t = get_template("norm")
    mode = smoke.Mode(tiny=True, device=DEVICE, dtype=torch.float32, interpreter=INTERP)
    _, shape = smoke.template_shape("norm", mode)
    return smoke, t, shape


def _scaled(launch):
    def broken(inputs, config, out=None):
        res = launch(inputs, config, out=out)
        for v in res.values():
            v.mul_(1.01)
        return res
    return broken


def _skips_a_row(launch):
    def broken(inputs, config, out=None):
        if out is None:
            return launch(inputs, config)
        cut = {k: v[1:] for k, v in out.items()}  # the kernel writes all rows but the first
        small = {k: (v[1:] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in inputs.items()}
        launch(small, config, out=cut)
        return out
    return broken


def _ignores_out(launch):
    def broken(inputs, config, out=None):
        return launch(inputs, config)
    return broken


def _raises(launch):
    def broken(inputs, config, out=None):
        raise RuntimeError("first line\nthe kernel blew up")
    return broken


@needs_kernels
@pytest.mark.parametrize("breakage, says", [
    (None, ""),
    (_scaled, "norm: check run: output 'y': norm-wise error 1.000e-02"),
    (_skips_a_row, "unwritten: "),
    (_ignores_out, "ignored out="),
    (_raises, "RuntimeError: the kernel blew up"),
], ids=["intact", "scaled-1.01", "unwritten-row", "ignores-out", "raises"])
def test_a_broken_kernel_fails_its_row(breakage, says):
    smoke, t, shape = _norm_case()
    if breakage is not None:
        t = dataclasses.replace(t, launch=breakage(t.launch))
    row = smoke.check_template(t, shape, torch.float32, DEVICE)
    assert row.name == "template:norm" and row.shape == smoke.fmt_shape(shape)
    if breakage is None:
        assert row.status == "PASS", row.detail
    else:
        assert row.status == "FAIL" and says in row.detail, row.detail


@needs_kernels
def test_a_failing_check_makes_the_exit_status_nonzero(tmp_path, monkeypatch):
    import momtune.kernels

    smoke, t, _ = _norm_case()
    broken = dataclasses.replace(t, launch=_scaled(t.launch))
    monkeypatch.setattr(momtune.kernels, "get_template", lambda name: broken)
    out = tmp_path / "smoke.json"
    assert smoke.main(["--tiny", "--only", "template:norm", "--out", str(out)]) == 1
    data = json.loads(out.read_text())
    assert not data["ok"] and data["failed"] == ["template:norm"]
    assert [r["name"] for r in data["rows"]] == ["template:norm"]


def test_generate_divergence_passes_only_at_a_near_tie():
    smoke = _smoke()
    T, V = 3, 5
    want = torch.tensor([[1, 2, 0, 4, 4], [1, 2, 0, 3, 3]])
    got = want.clone()
    got[1, 3:] = torch.tensor([1, 1])  # row 1 diverges at column 3 (step 0: the prefill's last logits)
    ref_logits = torch.zeros(2, T, V)
    ref_logits[1, -1, 3], ref_logits[1, -1, 1] = 1.0, 0.999  # reference: 3 by a margin of 1e-3
    near = ref_logits.clone()
    near[1, -1, 1] = 1.0 + 1e-4  # momtune's logits: 1 by 1e-4 (|d| 1.1e-3 >= margin / 2)
    ok, detail = smoke._near_tie(got, want, T, [near], [ref_logits], [])
    assert ok and "near-tie" in detail and "column 3" in detail
    ok, detail = smoke._near_tie(got, want, T, [ref_logits], [ref_logits], [])  # same logits, other token
    assert not ok and "not a near-tie" in detail
    ok, detail = smoke._near_tie(got, want, T, [near], [ref_logits], [0])  # logits over the bound there
    assert not ok and "over the bound" in detail


def test_only_takes_names_and_prefixes_at_a_colon():
    smoke = _smoke()
    assert smoke.selected(["template:norm_bwd"], [])
    assert smoke.selected(["template:norm_bwd"], ["template"]) and smoke.selected(["template:norm"], ["template:"])
    assert smoke.selected(["template:norm"], ["template:norm"])
    assert not smoke.selected(["template:norm_bwd"], ["template:norm"])  # was taken as a plain prefix
    assert smoke.selected(["lm:fp32-logits", "lm:fp32-generate"], ["layer", "lm"])
    assert not smoke.selected(["layer:prefill+decode"], ["lay"])
