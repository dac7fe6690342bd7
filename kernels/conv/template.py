"""Template "conv": fused gather + causal depthwise conv (width 4) + SiLU over the packed
segments (zero history), with the final windows (decode cache).

Shape keys: B, T, E, topk, shared (0/1), C. Inputs: a real routing (momtune.reference) gives
token_index / row_mem / row_seg / cu_seqlens; src is [B*T, M, C] (per-memory projections).
"""
from __future__ import annotations

from pathlib import Path

import torch

from momtune.kernels.template import DEFAULT_TOLERANCE, Inputs, Outputs, Shape, Template

from .conv import DEFAULT_CONFIG, segment_conv

HERE = Path(__file__).resolve().parent
WIDTH = 4


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int) -> Inputs:
    from momtune.kernels.routing.template import distinct_logits, reference_layout

    B, T, E, k, sh, C = (int(shape[x]) for x in ("B", "T", "E", "topk", "shared", "C"))
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    lay = reference_layout(distinct_logits(B, T, E, torch.float32, dev, gen), k, bool(sh))
    M = E + sh
    return {
        "src": torch.randn(B * T, M, C, generator=gen, device=dev).to(dtype),
        "weight": (0.5 * torch.randn(C, WIDTH, generator=gen, device=dev)).to(dtype),
        **{key: lay[key].to(torch.int32) for key in ("token_index", "row_mem", "row_seg", "cu_seqlens")},
    }


def launch(inputs: Inputs, config: dict, out: dict | None = None) -> Outputs:
    src, cu = inputs["src"], inputs["cu_seqlens"]
    C, W = inputs["weight"].shape
    fw = None if out is None else out.get("final_window")
    if fw is None:
        fw = torch.empty((cu.numel() - 1, W - 1, C), dtype=src.dtype, device=src.device)
    y = segment_conv(src, inputs["weight"], inputs["token_index"], inputs["row_mem"], inputs["row_seg"], cu,
                     final_window=fw, config=config, out=None if out is None else out.get("y"))
    return {"y": y, "final_window": fw}


def gathered_rows(inputs: Inputs) -> torch.Tensor:
    src, tok = inputs["src"], inputs["token_index"].long()
    return src[tok, inputs["row_mem"].long()] if src.dim() == 3 else src[tok]


def reference(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Outputs:
    from momtune.reference.conv import short_conv

    y, fw = short_conv(gathered_rows(inputs).to(dtype), inputs["weight"].to(dtype), inputs["cu_seqlens"].long())
    return {"y": y, "final_window": fw}


def cost(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    B, T, E, k, sh, C = (int(shape[x]) for x in ("B", "T", "E", "topk", "shared", "C"))
    elt = torch.finfo(dtype).bits // 8
    Np, S = B * T * (k + sh), B * (E + sh)
    flops = Np * C * (2 * WIDTH + 4)
    # only the Np gathered source rows are read (src holds all M memories' projections)
    nbytes = 2 * Np * C * elt + C * WIDTH * elt + 3 * Np * 4 + (S + 1) * 4 + S * (WIDTH - 1) * C * elt
    return float(flops), float(nbytes)


TEMPLATE = Template(
    name="conv",
    shape_keys=("B", "T", "E", "topk", "shared", "C"),
    make_inputs=make_inputs,
    launch=launch,
    reference=reference,
    default_config=dict(DEFAULT_CONFIG),
    cuda_graph=True,  # timed as a graph replay: its GPU time, not the host's launch cost (see Template)
    cost=cost,
    sources=tuple(str(HERE / f) for f in ("conv.py", "template.py")) + (str(HERE.parent / "routing" / "common.py"),),
    tolerances={**DEFAULT_TOLERANCE, torch.float32: (1e-4, 1e-4)},
)
