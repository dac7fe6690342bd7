"""Template "swiglu": the MLP activation silu(g) * u between gate/up_proj and down_proj.

Shape keys: N (rows = B*T), I (the MLP width: 2048 for mom-340m, 5632 for mom-1.3b).
"""
from __future__ import annotations

from pathlib import Path

import torch

from momtune.kernels.template import DEFAULT_TOLERANCE, Inputs, Outputs, Shape, Template

from .swiglu import DEFAULT_CONFIG, swiglu

HERE = Path(__file__).resolve().parent


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int) -> Inputs:
    N, I = int(shape["N"]), int(shape["I"])
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    return {"g": (3.0 * torch.randn(N, I, generator=gen, device=dev)).to(dtype),
            "u": torch.randn(N, I, generator=gen, device=dev).to(dtype)}


def launch(inputs: Inputs, config: dict, out: dict | None = None) -> Outputs:
    return {"y": swiglu(inputs["g"], inputs["u"], config=config, out=None if out is None else out.get("y"))}


def reference(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Outputs:
    import torch.nn.functional as F

    return {"y": F.silu(inputs["g"].to(dtype)) * inputs["u"].to(dtype)}


def cost(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    n = int(shape["N"]) * int(shape["I"])
    return float(6 * n), float(3 * n * (torch.finfo(dtype).bits // 8))


TEMPLATE = Template(
    name="swiglu",
    shape_keys=("N", "I"),
    make_inputs=make_inputs,
    launch=launch,
    reference=reference,
    default_config=dict(DEFAULT_CONFIG),
    cuda_graph=True,  # timed as a graph replay: its GPU time, not the host's launch cost (see Template)
    cost=cost,
    sources=tuple(str(HERE / f) for f in ("swiglu.py", "template.py")) + (str(HERE.parent / "routing" / "common.py"),),
    tolerances={**DEFAULT_TOLERANCE, torch.float32: (1e-5, 1e-5)},
)
