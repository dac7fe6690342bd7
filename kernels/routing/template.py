"""Template "routing": fp32 softmax top-k router + stable grouping into packed segments.

Shape keys: B, T, E, topk, shared (0/1), D. D (the model width) does not change the routing
kernels; it is kept so routing shares the layer's shape buckets (gather_rows, which uses it,
is not part of the timed op).
"""
from __future__ import annotations

from pathlib import Path

import torch

from momtune.kernels.template import Inputs, Outputs, Shape, Template

from .routing import DEFAULT_CONFIG, route_and_group

HERE = Path(__file__).resolve().parent
OUTPUT_KEYS = ("weights", "idx", "cu_seqlens", "slot", "token_index", "row_mem", "row_seg")


def distinct_logits(B: int, T: int, E: int, dtype: torch.dtype, device: torch.device | str,
                    gen: torch.Generator) -> torch.Tensor:
    """Random logits [B, T, E] whose values within a token differ by >= 0.3 (no top-k ties, even
    after rounding to bfloat16), so kernel and torch.topk must pick the same memories."""
    dev = torch.device(device)
    ranks = torch.rand(B, T, E, generator=gen, device=dev).argsort(-1).float()
    jitter = torch.rand(B, T, E, generator=gen, device=dev)
    return ((ranks + 0.8 * jitter) * 1.5 - 1.5 * E / 2).to(dtype)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int) -> Inputs:
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    logits = distinct_logits(shape["B"], shape["T"], shape["E"], dtype, device, gen)
    return {"logits": logits, "topk": int(shape["topk"]), "shared": bool(shape["shared"])}


def launch(inputs: Inputs, config: dict, out: dict | None = None) -> Outputs:
    res = route_and_group(inputs["logits"], inputs["topk"], shared=inputs["shared"], config=config, out=out)
    return dict(res._asdict())


def reference_layout(logits: torch.Tensor, topk: int, shared: bool, valid: torch.Tensor | None = None,
                     seq_offsets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The packed layout by momtune.reference.routing (int64 indices, weights in logits' precision).

    With ``valid`` [B, T] bool, a padding token has idx -1 and weight 0 in every slot, and the
    rows after the segments (its rows) have memory 0 and segment B*M-1, as the kernels write."""
    from momtune.reference.routing import group, route

    B, T, E = logits.shape
    w, idx = route(logits, topk)
    if shared:
        idx = torch.cat([idx, torch.full((B, T, 1), E, dtype=idx.dtype, device=idx.device)], -1)
        w = torch.cat([w, torch.ones((B, T, 1), dtype=w.dtype, device=w.device)], -1)
    M = E + int(shared)
    g = group(idx, M, valid, seq_offsets)
    rows = torch.arange(g.token_index.numel(), device=logits.device)
    row_seg = torch.searchsorted(g.cu_seqlens[1:], rows, right=True)
    row_mem = row_seg % M
    if valid is not None:
        w = torch.where(valid[..., None], w, 0.0)
        idx = torch.where(valid[..., None], idx, -1)
        tail = rows >= g.cu_seqlens[-1]
        row_seg, row_mem = torch.where(tail, g.cu_seqlens.numel() - 2, row_seg), torch.where(tail, 0, row_mem)
    return {"weights": w, "idx": idx, "cu_seqlens": g.cu_seqlens, "slot": g.slot,
            "token_index": g.token_index, "row_mem": row_mem, "row_seg": row_seg}


def reference(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Outputs:
    ref = reference_layout(inputs["logits"].to(dtype), inputs["topk"], inputs["shared"])
    return {k: ref[k].to(dtype) for k in OUTPUT_KEYS}


def cost(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    B, T, E, k, sh = (int(shape[x]) for x in ("B", "T", "E", "topk", "shared"))
    J, M = k + sh, E + sh
    tokens = B * T
    flops = tokens * E * (5 + 2 * k)  # softmax + k arg-max passes
    elt = torch.finfo(dtype).bits // 8
    nbytes = tokens * E * elt + tokens * J * 4 * 3 + (B * M + 1) * 4 + tokens * J * 4 * 3  # logits; w/idx/slot; cu; 3 row maps
    return float(flops), float(nbytes)


TEMPLATE = Template(
    name="routing",
    shape_keys=("B", "T", "E", "topk", "shared", "D"),
    make_inputs=make_inputs,
    launch=launch,
    reference=reference,
    default_config=dict(DEFAULT_CONFIG),
    cuda_graph=True,  # timed as a graph replay: its GPU time, not the host's launch cost (see Template)
    cost=cost,
    sources=tuple(str(HERE / f) for f in ("routing.py", "common.py", "template.py")),
    # indices must match exactly (any error >= 1); weights are fp32 whatever the logits' dtype
    tolerances={dt: (1e-5, 1e-5) for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)},
)
