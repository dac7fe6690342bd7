"""Template "conv_bwd": the backward of the fused gather + causal depthwise conv + SiLU (issue 14),
the gradients of the per-memory source and of the conv weight.

Shape keys as "conv": B, T, E, topk, shared (0/1), C. Inputs are the forward's (a real routing's
layout, src [B*T, M, C], weight [C, 4]) and dy [Np, C]; outputs dsrc [B*T, M, C] (zero for the
memories a token did not pick) and dw [C, 4]. The reference differentiates the forward's
reference in float64 with autograd.
"""
from __future__ import annotations

from pathlib import Path

import torch

from momtune.kernels.template import DEFAULT_TOLERANCE, Inputs, Outputs, Shape, Template, reference_gradients

from .backward import DEFAULT_CONFIG, segment_conv_backward
from .template import WIDTH
from .template import make_inputs as forward_inputs
from .template import reference as forward_reference

HERE = Path(__file__).resolve().parent


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int) -> Inputs:
    inputs = forward_inputs(shape, dtype, device, seed)
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed + 7919)
    Np, C = inputs["token_index"].shape[0], inputs["src"].shape[-1]
    inputs["dy"] = torch.randn(Np, C, generator=gen, device=dev).to(dtype)
    return inputs


def launch(inputs: Inputs, config: dict, out: dict | None = None) -> Outputs:
    dsrc, dw = segment_conv_backward(inputs["src"], inputs["weight"], inputs["token_index"], inputs["row_mem"],
                                     inputs["row_seg"], inputs["cu_seqlens"], inputs["dy"], config=config, out=out)
    return {"dsrc": dsrc, "dw": dw}


def reference(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Outputs:
    return reference_gradients(forward_reference, inputs, {"dsrc": "src", "dw": "weight"},
                               {"y": inputs["dy"], "final_window": None}, dtype)


def cost(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    B, T, E, k, sh, C = (int(shape[x]) for x in ("B", "T", "E", "topk", "shared", "C"))
    elt = torch.finfo(dtype).bits // 8
    Np, M = B * T * (k + sh), E + sh
    programs = -(-Np // DEFAULT_CONFIG["BLOCK_N"])
    flops = Np * C * (4 * WIDTH + 10)
    # pass 1: gathered rows + dy read, da (fp32) written, partial dw; pass 2: da read, dsrc zeroed
    # and its Np rows written; 3 index maps read twice
    nbytes = (2 * Np * C * elt + Np * C * 4 + 2 * programs * WIDTH * C * 4 + Np * C * 4
              + B * T * M * C * elt + Np * C * elt + 6 * Np * 4)
    return float(flops), float(nbytes)


TEMPLATE = Template(
    name="conv_bwd",
    shape_keys=("B", "T", "E", "topk", "shared", "C"),
    make_inputs=make_inputs,
    launch=launch,
    reference=reference,
    default_config=dict(DEFAULT_CONFIG),
    cuda_graph=True,  # timed as a graph replay: its GPU time, not the host's launch cost (see Template)
    cost=cost,
    sources=tuple(str(HERE / f) for f in ("backward.py", "template_bwd.py", "conv.py", "template.py"))
    + (str(HERE.parent / "routing" / "common.py"),),
    tolerances={**DEFAULT_TOLERANCE, torch.float32: (1e-4, 1e-4)},
)
