"""Builders shared by the reference tests (float64, tiny shapes)."""
from __future__ import annotations

import torch

from momtune.reference.layer import MoMAttention

# D 24, H 2, K 8, V 16: every projection has a distinct shape, so a transposed weight fails loudly.
LAYER_SIZES = dict(hidden_size=24, num_heads=2, head_dim=8, expand_v=2, conv_size=4, norm_eps=1e-5)


def make_layer(E: int = 4, topk: int = 2, shared: bool = True, single_kv: bool = False, seed: int = 0,
               **kw) -> MoMAttention:
    torch.manual_seed(seed)
    args = {**LAYER_SIZES, **kw}
    layer = MoMAttention(num_memories=E, topk=topk, shared_mem=shared, single_kv_proj=single_kv, **args).double()
    with torch.no_grad():  # larger gate / value weights than the init, so routing and read-outs matter
        layer.gate.weight.normal_(0, 0.5)
        layer.o_norm.weight.uniform_(0.5, 1.5)
    return layer.eval()


def layer_id(B: int, T: int, E: int, topk: int, shared: bool, single_kv: bool = False) -> str:
    return f"B{B}-T{T}-E{E}-top{topk}-{'shared' if shared else 'noshared'}" + ("-singlekv" if single_kv else "")


def max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (norm-wise relative error)."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
