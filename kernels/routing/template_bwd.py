"""Template "routing_bwd": d router logits from d routing weights through the renormalised top-k
softmax (issue 14). Shape keys as "routing" (D kept so it shares the layer's shape buckets).
Inputs: the logits (for the reference), the routing's weights and idx (top-k, then the shared
slot) as the forward returns them, and dweights [B, T, J]; output dlogits in the logits' dtype. The reference differentiates momtune.reference.routing.route in
float64 with autograd."""
from __future__ import annotations

from pathlib import Path

import torch

from momtune.kernels.template import DEFAULT_TOLERANCE, Inputs, Outputs, Shape, Template

from .backward import DEFAULT_CONFIG, route_weights_backward
from .template import distinct_logits, reference_layout

HERE = Path(__file__).resolve().parent


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int) -> Inputs:
    B, T, E, k, sh = (int(shape[x]) for x in ("B", "T", "E", "topk", "shared"))
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    logits = distinct_logits(B, T, E, dtype, dev, gen)
    lay = reference_layout(logits.float(), k, bool(sh))  # the forward's weights: fp32 softmax, top-k, renormalised
    return {"logits": logits, "weights": lay["weights"].float(), "idx": lay["idx"].to(torch.int32), "topk": k,
            "dweights": torch.randn(B, T, k + sh, generator=gen, device=dev)}


def launch(inputs: Inputs, config: dict, out: dict | None = None) -> Outputs:
    return {"dlogits": route_weights_backward(inputs["weights"], inputs["idx"], inputs["dweights"], inputs["topk"],
                                              inputs["logits"].shape[-1], dtype=inputs["logits"].dtype, config=config,
                                              out=None if out is None else out.get("dlogits"))}


def reference(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Outputs:
    from momtune.reference.routing import route

    k = inputs["topk"]
    with torch.enable_grad():
        logits = inputs["logits"].detach().to(dtype).requires_grad_(True)
        w, idx = route(logits, k)
        (dl,) = torch.autograd.grad(w, logits, inputs["dweights"][..., :k].to(w.dtype))
    if not torch.equal(idx, inputs["idx"][..., :k].long()):
        raise ValueError("routing_bwd reference: the inputs' idx is not the top-k of their logits")
    return {"dlogits": dl.detach()}


def cost(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    B, T, E, k, sh = (int(shape[x]) for x in ("B", "T", "E", "topk", "shared"))
    tokens, elt = B * T, torch.finfo(dtype).bits // 8
    return float(tokens * (E * 3 * k + 6 * k)), float(tokens * (2 * E * elt + (k + sh) * 8))


TEMPLATE = Template(
    name="routing_bwd",
    shape_keys=("B", "T", "E", "topk", "shared", "D"),
    make_inputs=make_inputs,
    launch=launch,
    reference=reference,
    default_config=dict(DEFAULT_CONFIG),
    cuda_graph=True,  # timed as a graph replay: its GPU time, not the host's launch cost (see Template)
    cost=cost,
    sources=tuple(str(HERE / f) for f in ("backward.py", "template_bwd.py", "common.py")),
    tolerances={**DEFAULT_TOLERANCE, torch.float32: (1e-5, 1e-5)},
)
