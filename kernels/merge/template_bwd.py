"""Template "merge_bwd": the backward of the weighted merge with the fused gated RMSNorm (issue 14).

Shape keys as "merge": B, T, H, V, J (slots per token), fused_norm (0/1). Inputs are the
forward's (a real grouping's slot and weights, the packed read-outs, gate and norm weight) and
dy; outputs the gradients of o_packed and the weights (and of gate and the norm weight when
fused). The reference differentiates the forward's reference in float64 with autograd.
"""
from __future__ import annotations

from pathlib import Path

import torch

from momtune.kernels.template import DEFAULT_TOLERANCE, Inputs, Outputs, Shape, Template, reference_gradients

from .backward import DEFAULT_CONFIG, merge_backward
from .template import EPS
from .template import make_inputs as forward_inputs
from .template import reference as forward_reference

HERE = Path(__file__).resolve().parent


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int) -> Inputs:
    inputs = forward_inputs(shape, dtype, device, seed)
    B, T, H, V = (int(shape[k]) for k in ("B", "T", "H", "V"))
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed + 7919)
    inputs["dy"] = torch.randn(B, T, H, V, generator=gen, device=dev).to(dtype)
    return inputs


def launch(inputs: Inputs, config: dict, out: dict | None = None) -> Outputs:
    return merge_backward(inputs["o_packed"], inputs["slot"], inputs["weights"], inputs["dy"], gate=inputs["gate"],
                          norm_weight=inputs["norm_weight"], eps=EPS, config=config, out=out)


def reference(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Outputs:
    wrt = {"do_packed": "o_packed", "dweights": "weights"}
    if inputs["gate"] is not None:
        wrt.update(dgate="gate", dnorm_weight="norm_weight")
    return reference_gradients(forward_reference, inputs, wrt, {"y": inputs["dy"]}, dtype)


def cost(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    B, T, H, V, J, fused = (int(shape[k]) for k in ("B", "T", "H", "V", "J", "fused_norm"))
    elt = torch.finfo(dtype).bits // 8
    n = B * T * H * V
    flops = 4 * J * n + (16 * n if fused else 0)
    # o rows read (twice when fused: m is recomputed), dy read, do written, slot + w, gate read + dgate written
    nbytes = J * n * elt * (2 + fused) + n * elt + B * T * J * 8 + (2 * n * elt if fused else 0)
    return float(flops), float(nbytes)


TEMPLATE = Template(
    name="merge_bwd",
    shape_keys=("B", "T", "H", "V", "J", "fused_norm"),
    make_inputs=make_inputs,
    launch=launch,
    reference=reference,
    default_config=dict(DEFAULT_CONFIG),
    cuda_graph=True,  # timed as a graph replay: its GPU time, not the host's launch cost (see Template)
    cost=cost,
    sources=tuple(str(HERE / f) for f in ("backward.py", "template_bwd.py", "merge.py")) + (str(HERE.parent / "routing" / "common.py"),),
    tolerances={**DEFAULT_TOLERANCE, torch.float32: (1e-4, 1e-4)},
)
