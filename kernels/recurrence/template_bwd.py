"""Template "recurrence_bwd": the gated-delta recurrence's backward from zero states, as a training
step runs it (issue 14; its launcher also takes the gated-linear rule, initial states and the final
states' gradient, which the compile gate compiles: ``GATE_VARIANTS``): q and k L2-normalised (q scaled by K^-1/2) by :mod:`.qk_norm`, the chunk
backward's four launches (:mod:`.chunk_bwd`: chunk terms, forward scan, backward scan, chunk
gradients), the normalisation's gradient. Its config is :func:`.chunk_bwd.chunk_backward`'s launch
parameters and ``chunk``, the backward's own chunk size.

Shape keys as "recurrence": N, S, H, K, V. Inputs are the recurrence template's (uneven segments,
one empty and one of length 1 when S >= 3), without an initial state, plus do [N, H, V] in the
dtype; outputs dq, dk [N, H, K], dv [N, H, V] and dg, dbeta [N, H] in their inputs' dtypes. The
reference differentiates the recurrence template's reference (the chunked recurrence in PyTorch)
with autograd in float64, as every backward template's does.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..template import DEFAULT_TOLERANCE, Config, Inputs, Outputs, Shape, Template, reference_gradients
from .chunk_bwd import DEFAULT_CONFIG, TritonBackward
from .template import cost as forward_cost
from .template import make_inputs as forward_inputs
from .template import reference as forward_reference

_HERE = Path(__file__).resolve().parent


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int) -> Inputs:
    inputs = forward_inputs(shape, dtype, device, seed)
    del inputs["initial_state"]  # a training step's recurrence starts from zero states
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed + 7919)
    n, h, vd = inputs["v"].shape
    inputs["do"] = torch.randn(n, h, vd, generator=gen, device=dev).to(dtype)
    return inputs


def launch(inputs: Inputs, config: Config | None = None, out: Outputs | None = None) -> Outputs:
    """The gradients (module doc). Optional inputs (not the template's, which tunes the training
    step: the compile gate's ``gate_variants``): "rule" "gated_linear" (no dbeta), an
    "initial_state" [S, H, K, V] float32 (its gradient "dinitial_state" too) and "dfinal", the
    final states' gradient."""
    from .chunk import dot_precision

    cfg = {**DEFAULT_CONFIG, **(config or {})}
    scans = TritonBackward(dot=dot_precision(inputs["q"].dtype), **cfg)
    cu = [int(c) for c in inputs["cu_seqlens"].tolist()]
    q = inputs["q"]
    delta = inputs.get("rule", "gated_delta") == "gated_delta"
    extra = {n: inputs[n] for n in ("initial_state", "dfinal") if inputs.get(n) is not None}
    got = scans.normalised_backward(q, inputs["k"], inputs["v"], inputs["g"], inputs["beta"] if delta else None,
                                    inputs["do"], cu, cfg["chunk"], q.shape[-1] ** -0.5, out=out, **extra)
    names = ("dq", "dk", "dv", "dg", "dbeta", "dinitial_state")
    return {n: x for n, x in zip(names, got) if x is not None}


def _with_states(inputs: Inputs, rule: str) -> Inputs:
    """``inputs`` with ``rule``, random initial states and final states' gradient (gate_variants)."""
    s, h, kd, vd = len(inputs["cu_seqlens"]) - 1, *inputs["k"].shape[1:], inputs["v"].shape[-1]
    gen = torch.Generator().manual_seed(4049)
    states = [torch.randn(s, h, kd, vd, generator=gen).to(inputs["v"].device) for _ in range(2)]
    return {**inputs, "rule": rule, "initial_state": states[0], "dfinal": states[1]}


#: the compile gate's other inputs: both rules from initial states with the final states' gradient
#: (the zero-state delta rule, the tuned one, is the template's own inputs)
GATE_VARIANTS = (lambda x: _with_states(x, "gated_delta"), lambda x: _with_states(x, "gated_linear"))


def reference(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Outputs:
    """Autograd of the recurrence template's reference (the chunked recurrence in PyTorch, in
    ``dtype``) from zero states, given do: never the kernels' hand-written backward."""
    return reference_gradients(forward_reference, {**inputs, "initial_state": None},
                               {"dq": "q", "dk": "k", "dv": "v", "dg": "g", "dbeta": "beta"},
                               {"o": inputs["do"], "final_state": None}, dtype)


def cost(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    """(flops, bytes): ~3x the forward's matmuls (the terms, the two scans' state products, the
    gradients' K x V products); bytes: the inputs and do read, the gradients written, and the
    float32 workspace of the chunk backward (W, KD, QE, U, do, vnew, dvnew written and read once,
    the starting states and their gradients [C, H, K, V] written and read once)."""
    n, s, h, kd, vd = (int(shape[key]) for key in ("N", "S", "H", "K", "V"))
    e = torch.empty((), dtype=dtype).element_size()
    flops, _ = forward_cost(shape, dtype)
    L = DEFAULT_CONFIG["chunk"]
    chunks = (n + s * (L - 1)) // L  # at most: every segment's last chunk partial
    io = n * h * (2 * (2 * kd + 2 * vd) * e + 4 * (e + 4))
    work = 2 * chunks * h * L * 4 * (3 * kd + 4 * vd) + 2 * 2 * chunks * h * kd * vd * 4
    return 3.0 * flops, float(io + work)


def check_config(shape: Shape, config: Config) -> str:
    """Why ``config`` cannot run ``shape`` ('' if it can); mirrors the TOML constraints."""
    cfg = {**DEFAULT_CONFIG, **config}
    tile = cfg["block_k"] * cfg["block_v"]
    if tile >= 4096 and cfg["num_stages"] != 2:
        return "64 x 64 blocks spill 672 B in one stage (Triton 3.6, sm_90) and exceed the shared memory in three"
    if cfg["num_stages"] >= 3 and tile > 2048:
        return "three stages of K x V tiles over 2048 elements exceed the H100's shared memory"
    return ""


TEMPLATE = Template(
    name="recurrence_bwd",
    shape_keys=("N", "S", "H", "K", "V"),
    make_inputs=make_inputs,
    launch=launch,
    reference=reference,
    default_config=dict(DEFAULT_CONFIG),
    cost=cost,
    sources=tuple(str(_HERE / f) for f in ("chunk_bwd.py", "scan.py", "common.py", "qk_norm.py", "template_bwd.py")),
    tolerances={**DEFAULT_TOLERANCE, torch.float32: (2e-3, 2e-3), torch.bfloat16: (5e-2, 5e-2)},
    check_config=check_config,
    # no fallbacks: at K = V = 256 the backward scan takes 136-160 KiB of shared memory at every V
    # block (Triton 3.6, sm_90), more than sm_86 / sm_89 have (99 KiB); sm_80 (163 KiB) fits
    tf32=True,
    gate_variants=GATE_VARIANTS,
)
