"""The compile gate (momtune.aot): its config sample covers every choice of a search space, and
it fails a kernel that runs in the interpreter but does not compile for sm_90, naming it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from momtune.aot import covering_configs, gate_shapes
from momtune.kernels import get_template, template_names
from momtune.space import load_space

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", template_names())
def test_sample_holds_every_choice_a_valid_config_can(name):
    template = get_template(name)
    space = load_space(name, template=template)
    shapes = gate_shapes(space)
    shape = next((s for s, dt in shapes if dt == "bfloat16"), shapes[0][0])
    default = template.default_for("bfloat16")
    picked = covering_configs(space, shape, default)
    valid = space.enumerate(shape)
    assert all(space.is_valid(c, shape)[0] for c in picked)
    for p in space.parameters.values():
        possible = {json.dumps(c[p.name]) for c in valid}
        held = {json.dumps(c[p.name]) for c in [*picked, default]}
        assert possible <= held, f"{name}.{p.name}: {possible - held} never compiled"
    assert len(picked) <= sum(len(p.choices) for p in space.parameters.values())


def _compile(which: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import json, sys; from momtune.aot import capturing, compile_job, Job; "
        "from tests.engine.aot_fixture import launch\n"
        "with capturing([90]) as recs:\n"
        f"    launch({which!r}, 24)\n"
        "out = []\n"
        "for src, opts, cap in recs:\n"
        "    r = compile_job(Job('fixture', src.fn.__name__, {}, {'N': 24}, 'float32', 'default', cap, src, opts))\n"
        "    out.append(dict(ok=r.ok, error=r.error, kernel=r.job.kernel))\n"
        "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_gate_fails_a_kernel_that_only_the_interpreter_runs():
    res = _compile("broken")
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = json.loads(res.stdout.strip().splitlines()[-1])
    assert not row["ok"] and row["kernel"] == "_broken" and "CompilationError" in row["error"], row


def test_gate_passes_the_fixed_kernel():
    res = _compile("fixed")
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["ok"] and row["error"] == "", row


SEED_CHECK = """
import json, sys, torch
from momtune.aot import capturing, gate_shapes
from momtune.kernels import get_template, template_names
from momtune.space import load_space

# the recurrences also at a shape whose segments run to 16 chunks and more: an integer such as the
# longest segment's chunk count is divisible by 16 for some inputs and not for others
LONG = {"recurrence": {"N": 12288, "S": 6, "H": 1, "K": 16, "V": 16},
        "recurrence_bwd": {"N": 12288, "S": 6, "H": 1, "K": 16, "V": 16}}
out = {}
for name in template_names():
    template = get_template(name)
    small = [s for s, _ in gate_shapes(load_space(name, template=template)) if all(v <= 4096 for v in s.values())]
    shapes = small[:3] + ([LONG[name]] if name in LONG else [])
    for shape in shapes:
        cfg = template.default_for("float32")
        kinds = set()
        for seed in range(6):
            inputs = template.make_inputs(shape, torch.float32, "cpu", seed * 7919 + 17)
            with capturing([90]) as recs:
                template.launch(inputs, cfg)
            kinds.add(tuple(src.hash() for src, _, _ in recs))
        out[f"{name} {json.dumps(shape, sort_keys=True)}"] = len(kinds)
print(json.dumps(out))
"""


def test_a_template_compiles_once_a_shape_whatever_its_inputs():
    """H200, session 13: the recurrence backward's kernels compiled again for other input seeds of
    the same shape (the ragged segments moved where packed int32 tables started, and Triton
    specialises pointers on 16-byte alignment and integers on divisibility by 16), so trials spent
    2-6 s compiling in the benchmark worker and a training step would compile again as its routing
    changed. Every template's kernels, at its small shapes (and the recurrences' at segments of many
    chunks), specialise alike for six input seeds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", SEED_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    kinds = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(kinds) >= len(template_names()), kinds
    assert any(k.startswith("recurrence_bwd ") and '"N": 12288' in k for k in kinds)
    varying = {k: n for k, n in kinds.items() if n != 1}
    assert not varying, f"kernels specialised differently for other inputs of the same shape: {varying}"
