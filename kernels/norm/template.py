"""Template "norm": RMSNorm of a row, with the residual add fused in (residual = 1).

Shape keys: N (rows = B*T), D, residual (0/1). The LM block runs it twice per layer: attn_norm
(residual 0) and mlp_norm after the attention's residual add (residual 1).
"""
from __future__ import annotations

from pathlib import Path

import torch

from momtune.kernels.template import DEFAULT_TOLERANCE, Inputs, Outputs, Shape, Template

from .norm import DEFAULT_CONFIG, add_rms_norm

HERE = Path(__file__).resolve().parent
EPS = 1e-6


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int) -> Inputs:
    N, D, res = (int(shape[k]) for k in ("N", "D", "residual"))
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    return {
        "x": torch.randn(N, D, generator=gen, device=dev).to(dtype),
        "residual": (2.0 * torch.randn(N, D, generator=gen, device=dev)).to(dtype) if res else None,
        "weight": (1.0 + 0.2 * torch.randn(D, generator=gen, device=dev)).to(dtype),
    }


def launch(inputs: Inputs, config: dict, out: dict | None = None) -> Outputs:
    y, h = add_rms_norm(inputs["x"], inputs["weight"], residual=inputs["residual"], eps=EPS, config=config, out=out)
    return {"y": y, "h": h} if inputs["residual"] is not None else {"y": y}


def reference(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Outputs:
    from momtune.reference.norm import rms_norm

    h = inputs["x"].to(dtype)
    if inputs["residual"] is not None:
        h = h + inputs["residual"].to(dtype)
    y = rms_norm(h, inputs["weight"].to(dtype), EPS)
    return {"y": y, "h": h} if inputs["residual"] is not None else {"y": y}


def cost(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    N, D, res = (int(shape[k]) for k in ("N", "D", "residual"))
    elt = torch.finfo(dtype).bits // 8
    flops = N * D * (4 + res)
    nbytes = N * D * elt * (2 + 2 * res) + D * elt  # x (+ residual) read; y (+ h) written; weight
    return float(flops), float(nbytes)


TEMPLATE = Template(
    name="norm",
    shape_keys=("N", "D", "residual"),
    make_inputs=make_inputs,
    launch=launch,
    reference=reference,
    default_config=dict(DEFAULT_CONFIG),
    cuda_graph=True,  # timed as a graph replay: its GPU time, not the host's launch cost (see Template)
    cost=cost,
    sources=tuple(str(HERE / f) for f in ("norm.py", "template.py")) + (str(HERE.parent / "routing" / "common.py"),),
    tolerances={**DEFAULT_TOLERANCE, torch.float32: (1e-4, 1e-4)},
)
