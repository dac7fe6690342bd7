"""Template "swiglu_bwd": the backward of silu(g) * u, dg and du from dy (issue 14).

Shape keys as "swiglu": N (rows = B*T), I (the MLP width). The reference differentiates the
forward's reference in float64 with autograd (not the kernel's closed form), so a wrong
derivative cannot pass by agreeing with itself.
"""
from __future__ import annotations

from pathlib import Path

import torch

from momtune.kernels.template import DEFAULT_TOLERANCE, Inputs, Outputs, Shape, Template, reference_gradients

from .backward import DEFAULT_CONFIG, swiglu_backward
from .template import reference as forward_reference

HERE = Path(__file__).resolve().parent


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int) -> Inputs:
    N, I = int(shape["N"]), int(shape["I"])
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    return {"g": (3.0 * torch.randn(N, I, generator=gen, device=dev)).to(dtype),
            "u": torch.randn(N, I, generator=gen, device=dev).to(dtype),
            "dy": torch.randn(N, I, generator=gen, device=dev).to(dtype)}


def launch(inputs: Inputs, config: dict, out: dict | None = None) -> Outputs:
    dg, du = swiglu_backward(inputs["g"], inputs["u"], inputs["dy"], config=config, out=out)
    return {"dg": dg, "du": du}


def reference(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Outputs:
    return reference_gradients(forward_reference, inputs, {"dg": "g", "du": "u"}, {"y": inputs["dy"]}, dtype)


def cost(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    n = int(shape["N"]) * int(shape["I"])
    return float(12 * n), float(5 * n * (torch.finfo(dtype).bits // 8))


TEMPLATE = Template(
    name="swiglu_bwd",
    shape_keys=("N", "I"),
    make_inputs=make_inputs,
    launch=launch,
    reference=reference,
    default_config=dict(DEFAULT_CONFIG),
    cuda_graph=True,  # timed as a graph replay: its GPU time, not the host's launch cost (see Template)
    cost=cost,
    sources=tuple(str(HERE / f) for f in ("backward.py", "template_bwd.py")) + (str(HERE.parent / "routing" / "common.py"),),
    tolerances={**DEFAULT_TOLERANCE, torch.float32: (1e-5, 1e-5)},
)
