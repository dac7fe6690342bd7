"""Template "merge": y = sum_j w * o_packed[slot] (+ fused per-head gated RMSNorm).

Shape keys: B, T, H, V, J (slots per token, shared included), fused_norm (0/1). Inputs come
from a real grouping (J routed memories out of J + 1, no shared) so the gather pattern is the
one the layer sees.
"""
from __future__ import annotations

from pathlib import Path

import torch

from momtune.kernels.template import DEFAULT_TOLERANCE, Inputs, Outputs, Shape, Template

from .merge import DEFAULT_CONFIG, merge_prefill

HERE = Path(__file__).resolve().parent
EPS = 1e-5


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int) -> Inputs:
    from momtune.kernels.routing.template import distinct_logits, reference_layout

    B, T, H, V, J = (int(shape[k]) for k in ("B", "T", "H", "V", "J"))
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    lay = reference_layout(distinct_logits(B, T, J + 1, torch.float32, dev, gen), J, False)
    inputs: Inputs = {
        "o_packed": torch.randn(B * T * J, H, V, generator=gen, device=dev).to(dtype),
        "slot": lay["slot"].to(torch.int32),
        "weights": lay["weights"].float(),
        "gate": None,
        "norm_weight": None,
    }
    if shape["fused_norm"]:
        inputs["gate"] = torch.randn(B * T, H * V, generator=gen, device=dev).to(dtype)
        inputs["norm_weight"] = (1.0 + 0.2 * torch.randn(V, generator=gen, device=dev)).to(dtype)
    return inputs


def launch(inputs: Inputs, config: dict, out: dict | None = None) -> Outputs:
    y = merge_prefill(inputs["o_packed"], inputs["slot"], inputs["weights"], gate=inputs["gate"],
                      norm_weight=inputs["norm_weight"], eps=EPS, config=config,
                      out=None if out is None else out.get("y"))
    return {"y": y}


def reference(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Outputs:
    from momtune.reference.norm import gated_rms_norm
    from momtune.reference.routing import merge

    slot = inputs["slot"]
    B, T, J = slot.shape
    _, H, V = inputs["o_packed"].shape
    y = merge(inputs["o_packed"].to(dtype), slot.long(), inputs["weights"].to(dtype))
    if inputs["gate"] is not None:
        y = gated_rms_norm(y, inputs["gate"].to(dtype).view(B, T, H, V), inputs["norm_weight"].to(dtype), EPS)
    return {"y": y}


def cost(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    B, T, H, V, J, fused = (int(shape[k]) for k in ("B", "T", "H", "V", "J", "fused_norm"))
    elt = torch.finfo(dtype).bits // 8
    n = B * T * H * V
    flops = 2 * J * n + (8 * n if fused else 0)
    nbytes = J * n * elt + B * T * J * 8 + n * elt + ((n + V) * elt if fused else 0)  # o rows; slot+w; y; gate+weight
    return float(flops), float(nbytes)


TEMPLATE = Template(
    name="merge",
    shape_keys=("B", "T", "H", "V", "J", "fused_norm"),
    make_inputs=make_inputs,
    launch=launch,
    reference=reference,
    default_config=dict(DEFAULT_CONFIG),
    cuda_graph=True,  # timed as a graph replay: its GPU time, not the host's launch cost (see Template)
    cost=cost,
    sources=tuple(str(HERE / f) for f in ("merge.py", "template.py")) + (str(HERE.parent / "routing" / "common.py"),),
    tolerances={**DEFAULT_TOLERANCE, torch.float32: (1e-4, 1e-4)},
)
