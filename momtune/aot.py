"""The compile gate: every template's kernels compiled ahead of time for GPU targets, on any machine.

The interpreter (TRITON_INTERPRET=1) runs kernels on the CPU without compiling them, so a kernel
can pass every CPU test and fail to compile for a GPU (a runtime value in a ``tl.constexpr``
branch, a type mismatch between branches, an op a target lacks). This module runs each template's
real launcher on CPU tensors with Triton's launch replaced by a capture: the JIT's own binder
specialises the arguments exactly as a launch on the GPU would (dtypes, 16-byte alignment,
divisibility, constexprs, num_warps / num_stages), and :func:`triton.compile` builds the kernel
for ``GPUTarget("cuda", capability, 32)`` instead of running it. Triton ships ptxas, so this
reaches machine code for sm_90 / sm_80 without a GPU, and reads each kernel's shared memory.

What is compiled, per template: the default of each dtype and every fallback (for every target in
bfloat16, the dtype models run in; for sm_90 in float16 and float32; on the template's inputs and
on each of its ``gate_variants``, other inputs its launcher takes), at every shape of the
space's tiny set and the first of each other set (ragged tiny shapes and real model shapes take
different constexpr branches); and for sm_90 in bfloat16 a sample of configs that holds every
choice of every search-space parameter at least once (each constexpr branch a config can select;
on other GPUs the search itself records a config that does not compile). Identical
specialisations are compiled once. A default or fallback over the target's shared memory fails
(a fallback must fit everywhere, a default on sm_90); a sample over it is reported.

Run: ``python -m momtune.aot`` (all templates, sm_90 and sm_80; ``--help``). Must run without
TRITON_INTERPRET. A failure names the template, config, shape, dtype, kernel, target and Triton
version, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TARGETS = (90, 80)
GATE_DTYPES = ("bfloat16", "float16", "float32")
MODEL_DTYPE = "bfloat16"  # models run in it: sampled, and compiled for every target (others: sm_90 only)
SAMPLE_TARGETS = (90,)  # samples compile for Hopper; other targets get the defaults and fallbacks


@dataclass
class Job:
    """One specialisation of one kernel for one target, and where it came from."""

    template: str
    kernel: str
    config: dict[str, Any]
    shape: dict[str, int]
    dtype: str
    role: str  # "default", "fallback" or "sample"
    capability: int
    src: Any = field(repr=False, default=None)
    options: dict[str, Any] = field(repr=False, default_factory=dict)
    key: str = ""

    def where(self) -> str:
        return (f"template {self.template}, kernel {self.kernel}, {self.role} config {json.dumps(self.config, sort_keys=True)}, "
                f"shape {self.shape}, {self.dtype}, sm_{self.capability}")


@dataclass
class Result:
    job: Job
    ok: bool
    shared: int = -1
    seconds: float = 0.0
    error: str = ""


@contextlib.contextmanager
def capturing(capabilities: Sequence[int]) -> Iterator[list[tuple[Any, dict[str, Any], int]]]:
    """Within the block, a kernel launch compiles nothing and runs nothing: it records, per target
    capability, (ASTSource, options, capability) as Triton's own launch path would build them.
    Tensors may live on the CPU (the device check of the launchers is lifted)."""
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    import momtune.settings as settings

    if settings.interpreter_mode():
        raise RuntimeError("momtune.aot compiles kernels: run it without TRITON_INTERPRET")
    records: list[tuple[Any, dict[str, Any], int]] = []
    backends = {cap: make_backend(GPUTarget("cuda", cap, 32)) for cap in capabilities}

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        for cap, backend in backends.items():
            binder = jit.create_function_from_signature(self.signature, self.params, backend)
            bound, specialization, opts = binder(*args, **kwargs)
            options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, opts)
            records.append((ASTSource(self, signature, constexprs, attrs), options.__dict__, cap))

    saved_run, saved_mode = jit.JITFunction.run, settings.interpreter_mode
    jit.JITFunction.run = run
    settings.interpreter_mode = lambda: True  # launchers accept CPU tensors; nothing executes
    try:
        yield records
    finally:
        jit.JITFunction.run, settings.interpreter_mode = saved_run, saved_mode


def covering_configs(space: Any, shape: Mapping[str, int], default: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Configs valid at ``shape`` that, with ``default``, hold every choice of every parameter
    (each the valid config nearest the default, by the number of parameters changed); choices
    no valid config at ``shape`` can hold are left out."""
    valid = space.enumerate(shape)
    picked: list[dict[str, Any]] = []
    for p in space.parameters.values():
        for choice in p.choices:
            if any(c.get(p.name) == choice for c in (default, *picked)):
                continue
            options = [c for c in valid if c[p.name] == choice]
            if options:
                picked.append(min(options, key=lambda c: sum(c[k] != default.get(k) for k in c)))
    return picked


def gate_shapes(space: Any) -> list[tuple[dict[str, int], str]]:
    """(shape, dtype): every shape of the "tiny" set (small and ragged) and the first of every other
    set (real model shapes: building their inputs on the CPU costs seconds), deduplicated."""
    seen, out = set(), []
    for name, ss in space.shape_sets.items():
        for shape in ss.shapes if name == "tiny" else ss.shapes[:1]:
            key = json.dumps(dict(shape), sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append((dict(shape), ss.dtype))
    return out


@contextlib.contextmanager
def _tf32(on: bool | None) -> Iterator[None]:
    """torch.backends.cuda.matmul.allow_tf32 set to ``on`` inside (None: left as it is)."""
    if on is None:
        yield
        return
    from momtune.layer_check import tf32_matmuls

    with tf32_matmuls(on):
        yield


def plan_template(name: str, capabilities: Sequence[int], dtypes: Sequence[str] = GATE_DTYPES,
                  sample: bool = True) -> list[Job]:
    """Every (kernel, specialisation, target) the gate compiles for template ``name``; identical
    specialisations (same source, constexprs, types and options) are listed once."""
    import torch

    from momtune.kernels import get_template
    from momtune.space import load_space

    template = get_template(name)
    space = load_space(name, template=template)
    shapes = gate_shapes(space)
    main_shape = next((s for s, dt in shapes if dt == MODEL_DTYPE), shapes[0][0])
    jobs: list[Job] = []
    seen: set[str] = set()
    inputs: dict[str, Any] = {}  # per shape: built once for every config of a dtype (seconds at real shapes)
    for dtype in dtypes:
        inputs.clear()
        default = template.default_for(dtype)
        runs: list[tuple[str, dict[str, Any], dict[str, int]]] = []
        for shape, _ in shapes:
            runs.append(("default", default, shape))
            runs += [("fallback", {**default, **fb}, shape) for fb in template.fallbacks]
        if sample and dtype == MODEL_DTYPE:
            runs += [("sample", cfg, main_shape) for cfg in covering_configs(space, main_shape, default)
                     if cfg != default]
        for role, cfg, shape in runs:
            if role != "sample" and template.check_config is not None and template.check_config(shape, cfg):
                continue  # a default/fallback the template itself declines at this shape
            shape_key = json.dumps(shape, sort_keys=True)
            if shape_key not in inputs:
                inputs[shape_key] = template.make_inputs(shape, getattr(torch, dtype), "cpu", 0)
            records = []
            # float32 dots run in IEEE by default and in TF32 where torch allows it
            # (kernels' dot_precision): a template with tf32 dots is compiled both ways
            tf32_modes = (False, True) if dtype == "float32" and getattr(template, "tf32", False) else (None,)
            # the defaults and fallbacks also on the template's other inputs (gate_variants)
            variants = [lambda x: x, *(template.gate_variants if role != "sample" else ())]
            for tf32 in tf32_modes:
                for variant in variants:
                    with _tf32(tf32), capturing(capabilities) as captured:
                        template.launch(variant(inputs[shape_key]), cfg)
                    records += captured
            for src, options, cap in records:
                if cap not in SAMPLE_TARGETS and (role == "sample" or dtype != MODEL_DTYPE):
                    continue
                key = f"{src.hash()}-{json.dumps(options, sort_keys=True, default=str)}-{cap}"
                if key in seen:
                    continue
                seen.add(key)
                jobs.append(Job(name, src.fn.__name__, dict(cfg), shape, dtype, role, cap, src, options, key))
    return jobs


def compile_job(job: Job) -> Result:
    """Compile one job; a failure is a Result, not an exception. Shared memory over the target's
    limit fails a default or a fallback (they must run there), and is reported for samples."""
    import triton
    from triton.backends.compiler import GPUTarget

    from momtune.resources import SHARED_LIMIT

    t0 = time.perf_counter()
    try:
        compiled = triton.compile(job.src, target=GPUTarget("cuda", job.capability, 32), options=job.options)
    except Exception as exc:  # noqa: BLE001 - every compile error is a gate failure, reported with its job
        lines = [ln for ln in traceback.format_exception_only(type(exc), exc) if ln.strip()]
        msg = " ".join(" ".join(lines).split())
        return Result(job, False, seconds=time.perf_counter() - t0, error=msg[-600:])
    shared = int(compiled.metadata.shared)
    res = Result(job, True, shared, time.perf_counter() - t0)
    limit = SHARED_LIMIT.get(job.capability)
    if limit is not None and shared > limit:
        res.error = f"needs {shared} B of shared memory, sm_{job.capability} allows {limit} B per block"
        res.ok = job.role == "sample" or (job.role == "default" and job.capability != 90)
    return res


def main(argv: list[str] | None = None) -> int:
    import triton

    ap = argparse.ArgumentParser(prog="python -m momtune.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--template", nargs="*", help="templates to gate (default: every registered one)")
    ap.add_argument("--capability", type=int, nargs="*", default=list(DEFAULT_TARGETS),
                    help="compute capabilities to compile for (default: 90 80)")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                    help="compile processes (each compiles every --jobs-th kernel)")
    ap.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", metavar="FILE", help="write every result as JSON")
    args = ap.parse_args(argv)
    from momtune.kernels import template_names

    names = args.template or template_names()
    unknown = sorted(set(names) - set(template_names()))
    if unknown:
        ap.error(f"--template: unknown {unknown}; known: {template_names()}")
    if args.jobs < 1:
        ap.error(f"--jobs: expected >= 1, got {args.jobs}")
    caps = args.capability
    bad = [c for c in caps if c < 75]
    if bad:
        ap.error(f"--capability: Triton compiles for 75 and newer, got {bad}")

    if args.shard is None and args.jobs > 1:
        return _run_shards(argv or sys.argv[1:], args.jobs, args.json)
    t0 = time.perf_counter()
    jobs = [j for n in names for j in plan_template(n, caps)]
    if args.shard is not None:
        jobs = jobs[args.shard::args.jobs]
    results = [compile_job(j) for j in jobs]
    rows = [dict(template=r.job.template, kernel=r.job.kernel, role=r.job.role, config=r.job.config,
                 shape=r.job.shape, dtype=r.job.dtype, capability=r.job.capability, ok=r.ok, shared=r.shared,
                 seconds=round(r.seconds, 2), error=r.error) for r in results]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
    if args.shard is None:
        return _summary(rows, triton.__version__, time.perf_counter() - t0)
    return 0


def _run_shards(argv: list[str], jobs: int, out: str | None) -> int:
    import subprocess
    import tempfile

    import triton

    t0 = time.perf_counter()
    base = [a for a in argv]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(jobs):
            cmd = [sys.executable, "-m", "momtune.aot", *base, "--shard", str(i), "--json", f"{tmp}/{i}.json"]
            procs.append(subprocess.Popen(cmd))
        codes = [p.wait() for p in procs]
        rows = []
        for i, code in enumerate(codes):
            path = f"{tmp}/{i}.json"
            if code != 0 or not os.path.exists(path):
                print(f"momtune.aot: compile shard {i} crashed (exit {code})", file=sys.stderr)
                return 1
            with open(path) as f:
                rows += json.load(f)["rows"]
    if out:
        with open(out, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
    return _summary(rows, triton.__version__, time.perf_counter() - t0)


def _summary(rows: list[dict[str, Any]], version: str, seconds: float) -> int:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["template"], []).append(r)
    print(f"compile gate, Triton {version}: {len(rows)} kernels in {seconds:.0f} s")
    print(f"{'template':<11} {'kernels':>7} {'failed':>6} {'configs':>7} {'targets':<10} {'max shared (sm_90)':>18}")
    for name, rs in sorted(by.items()):
        cfgs = {json.dumps(r["config"], sort_keys=True) for r in rs}
        caps = sorted({r["capability"] for r in rs}, reverse=True)
        sm90 = [r["shared"] for r in rs if r["capability"] == 90 and r["shared"] >= 0]
        print(f"{name:<11} {len(rs):>7} {sum(not r['ok'] for r in rs):>6} {len(cfgs):>7} "
              f"{' '.join(f'sm_{c}' for c in caps):<10} {max(sm90, default=0) / 1024:>15.1f} KiB")
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"FAILED (Triton {version}): template {r['template']}, kernel {r['kernel']}, {r['role']} config "
              f"{json.dumps(r['config'], sort_keys=True)}, shape {r['shape']}, {r['dtype']}, sm_{r['capability']}: "
              f"{r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
