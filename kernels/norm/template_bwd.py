"""Template "norm_bwd": the backward of RMSNorm with the residual add (issue 14), dh and dw.

Shape keys as "norm": N (rows = B*T), D, residual (1: h is also the residual stream, so its
gradient dh_out is added). Inputs are what the backward gets: the saved h, the weight, dy (and
dh_out). The reference differentiates the forward's reference in float64 with autograd.
"""
from __future__ import annotations

from pathlib import Path

import torch

from momtune.kernels.template import DEFAULT_TOLERANCE, Inputs, Outputs, Shape, Template, reference_gradients

from .backward import DEFAULT_CONFIG, rms_norm_backward
from .template import EPS
from .template import reference as forward_reference

HERE = Path(__file__).resolve().parent


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int) -> Inputs:
    N, D, res = (int(shape[k]) for k in ("N", "D", "residual"))
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    return {
        "h": (2.0 * torch.randn(N, D, generator=gen, device=dev)).to(dtype),
        "weight": (1.0 + 0.2 * torch.randn(D, generator=gen, device=dev)).to(dtype),
        "dy": torch.randn(N, D, generator=gen, device=dev).to(dtype),
        "dh_out": torch.randn(N, D, generator=gen, device=dev).to(dtype) if res else None,
    }


def launch(inputs: Inputs, config: dict, out: dict | None = None) -> Outputs:
    dh, dw = rms_norm_backward(inputs["h"], inputs["weight"], inputs["dy"], dh_out=inputs["dh_out"], eps=EPS,
                               config=config, out=out)
    return {"dh": dh, "dw": dw}


def reference(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Outputs:
    # the forward's reference on h (the residual add is done); h's gradient as the residual stream adds on
    fwd = {"x": inputs["h"], "residual": None, "weight": inputs["weight"]}
    out = reference_gradients(forward_reference, fwd, {"dh": "x", "dw": "weight"}, {"y": inputs["dy"]}, dtype)
    if inputs["dh_out"] is not None:
        out["dh"] = out["dh"] + inputs["dh_out"].to(dtype)
    return out


def cost(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    N, D, res = (int(shape[k]) for k in ("N", "D", "residual"))
    elt = torch.finfo(dtype).bits // 8
    flops = N * D * (10 + res)
    nbytes = N * D * elt * (3 + res) + D * elt  # h, dy (+ dh_out) read; dh written; weight
    return float(flops), float(nbytes)


TEMPLATE = Template(
    name="norm_bwd",
    shape_keys=("N", "D", "residual"),
    make_inputs=make_inputs,
    launch=launch,
    reference=reference,
    default_config=dict(DEFAULT_CONFIG),
    cuda_graph=True,  # timed as a graph replay: its GPU time, not the host's launch cost (see Template)
    cost=cost,
    sources=tuple(str(HERE / f) for f in ("backward.py", "template_bwd.py")) + (str(HERE.parent / "routing" / "common.py"),),
    tolerances={**DEFAULT_TOLERANCE, torch.float32: (1e-4, 1e-4)},
)
