"""Fake templates for the engine tests: a Triton y = a*x + b kernel with a BLOCK parameter.

``FAKE`` is a plain template. ``FAULTY`` adds a ``FAULT`` parameter whose values inject each kind
of failure the engine must record and survive: a compilation error, out of resources, a hang, a
crash of the process (what an illegal memory access does), a wrong answer, an unwritten element
(left NaN), any other exception, and a right answer 20 ms late (``slow``). ``KILLER``'s worker
is killed from outside (SIGKILL, as the out-of-memory killer does) on its first run of a config
(``FAULT = "oom_once"``, a marker file in ``$MOMTUNE_TEST_MARKERS`` remembers it) or on every run
(``"oom_always"``), or dies as of an illegal memory access (``"crash_once"``, ``"crash_always"``),
or its launch raises torch's out-of-memory error (the device's memory held elsewhere:
``"devmem_once"``, ``"devmem_always"``, or on its first three runs: ``"devmem_thrice"``, a compile
worker's run, a run while the batch's other compiles hold the device, one retry).
"""
from __future__ import annotations

import ast
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from momtune.kernels.template import Template


@triton.jit
def _axpb(x_ptr, y_ptr, a, b, n, BLOCK: tl.constexpr, SKIP_LAST: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n - SKIP_LAST
    x = tl.load(x_ptr + offs, mask=m)
    tl.store(y_ptr + offs, a * x + b, mask=m)


def make_inputs(shape: Any, dtype: torch.dtype, device: Any, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape["N"], shape["C"], generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    a = float(torch.rand((), generator=g)) + 0.5
    return {"x": x, "a": a, "b": -0.25}


def reference(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"y": inputs["a"] * inputs["x"].double() + inputs["b"]}


def launch(inputs: dict[str, Any], config: Any, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    fault = config.get("FAULT", "none")
    if fault == "compile_error":
        raise triton.compiler.errors.CompilationError("def k(): pass", ast.parse("x").body[0], "invalid tile shape")
    if fault == "out_of_resources":
        raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
    if fault == "hang":
        time.sleep(3600)
    if fault == "crash":
        os._exit(3)
    if fault == "error":
        raise RuntimeError("something else went wrong\nsecond line")
    if fault == "slow":  # right, and 20 ms slower than any other config
        time.sleep(0.02)
    x = inputs["x"]
    y = out["y"] if out is not None else torch.empty_like(x)
    n = x.numel()
    block = config["BLOCK"]
    _axpb[(triton.cdiv(n, block),)](x, y, inputs["a"], inputs["b"], n, BLOCK=block,
                                    SKIP_LAST=1 if fault == "unwritten" else 0, num_warps=config["num_warps"])
    if fault == "wrong":
        y.add_(1.0)
    return {"y": y}


def cost(shape: Any, dtype: torch.dtype) -> tuple[float, float]:
    n = shape["N"] * shape["C"]
    return 2.0 * n, 2.0 * n * torch.empty((), dtype=dtype).element_size()


FAKE = Template(name="fake", shape_keys=("N", "C"), make_inputs=make_inputs, launch=launch, reference=reference,
                default_config={"BLOCK": 32, "num_warps": 1}, cost=cost, sources=(__file__,))
FAULTY = Template(name="faulty", shape_keys=("N", "C"), make_inputs=make_inputs, launch=launch, reference=reference,
                  default_config={"BLOCK": 32, "num_warps": 1, "FAULT": "none"}, cost=cost, sources=(__file__,))


def slow_launch(inputs: dict[str, Any], config: Any, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    time.sleep(0.15)
    return launch(inputs, config, out=out)


SLOW = Template(name="slow", shape_keys=("N", "C"), make_inputs=make_inputs, launch=slow_launch, reference=reference,
                default_config={"BLOCK": 32, "num_warps": 1}, cost=cost, sources=(__file__,))


def killer_launch(inputs: dict[str, Any], config: Any, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    fault = config.get("FAULT", "none")
    if fault != "none":
        marker = Path(os.environ["MOMTUNE_TEST_MARKERS"]) / f"{fault}-{config['BLOCK']}"
        if fault == "devmem_thrice":
            runs = int(marker.read_text()) if marker.exists() else 0
            marker.write_text(str(runs + 1))
            if runs < 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.52 GiB. GPU 0 has a total "
                                             "capacity of 139.80 GiB of which 885.81 MiB is free.")
        elif fault.endswith("_always") or not marker.exists():
            marker.touch()
            if fault.startswith("devmem"):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 384.00 MiB. GPU 0 has a total "
                                             "capacity of 139.80 GiB of which 257.81 MiB is free.")
            if fault.startswith("oom"):
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(1)  # crash_*: the worker dies as of an illegal memory access
    return launch(inputs, {**config, "FAULT": "none"}, out=out)


KILLER = Template(name="killer", shape_keys=("N", "C"), make_inputs=make_inputs, launch=killer_launch,
                  reference=reference, default_config={"BLOCK": 32, "num_warps": 1, "FAULT": "none"}, cost=cost,
                  sources=(__file__,))


def recorder_launch(inputs: dict[str, Any], config: Any, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``launch``, writing which worker process ran it on which inputs (their seed-drawn ``a``) to
    ``$MOMTUNE_TEST_MARKERS/launches``: a compile worker must run a config on the inputs its trial
    then runs on (ragged segments drawn from the seed set integer arguments that Triton
    specialises on: other inputs, another compile)."""
    import multiprocessing

    with open(Path(os.environ["MOMTUNE_TEST_MARKERS"]) / "launches", "a") as f:
        f.write(f"{multiprocessing.current_process().name} {config['BLOCK']} {inputs['a']!r}\n")
    return launch(inputs, config, out=out)


RECORDER = Template(name="recorder", shape_keys=("N", "C"), make_inputs=make_inputs, launch=recorder_launch,
                    reference=reference, default_config={"BLOCK": 32, "num_warps": 1}, cost=cost, sources=(__file__,))
