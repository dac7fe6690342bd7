"""Merge (+ fused gated RMSNorm) kernel against momtune.reference.routing.merge / norm."""
from __future__ import annotations

import pytest
import torch

from momtune.errors import ConfigError, InputError
from momtune.kernels.merge import merge_prefill
from momtune.kernels.routing.template import distinct_logits, reference_layout
from momtune.reference.norm import gated_rms_norm
from momtune.reference.routing import merge
from tests.helpers import assert_close, poison
from tests.kernels.test_routing import check_space, gpu_shapes, load_space, run_template

# (B, T, E, topk, shared, H, V, fused, gate_rank, BLOCK_T, dtype, bias)
CASES = [
    (2, 13, 4, 2, True, 2, 16, True, 2, 8, torch.float32, None),
    (1, 1, 4, 1, False, 1, 32, True, 3, 4, torch.float32, None),
    (2, 7, 3, 2, True, 3, 24, False, 0, 4, torch.float32, "empty"),
    (2, 9, 4, 4, False, 2, 16, True, 3, 2, torch.float32, None),
    (1, 10, 4, 1, True, 2, 16, True, 2, 16, torch.float16, "one"),
]


def case_id(c: tuple) -> str:
    B, T, E, k, sh, H, V, fused, gr, bt, dt, bias = c
    parts = [f"B{B}", f"T{T}", f"E{E}", f"top{k}", "shared" if sh else "noshared", f"H{H}", f"V{V}",
             f"norm-gate{gr}d" if fused else "plain", f"BT{bt}", str(dt).replace("torch.float", "fp")]
    return "-".join(parts + ([bias] if bias else []))


def make_case(case: tuple, seed: int):
    B, T, E, k, sh, H, V, fused, gr, bt, dt, bias = case
    gen = torch.Generator().manual_seed(seed)
    logits = distinct_logits(B, T, E, torch.float32, "cpu", gen)
    if bias == "empty":
        logits[..., 1] -= 100.0
    elif bias == "one":
        logits[..., 2] += 100.0
    lay = reference_layout(logits, k, sh)
    J = k + sh
    o = torch.randn(B * T * J, H, V, generator=gen).to(dt)
    gate = nw = None
    if fused:
        gate = torch.randn(B, T, H * V, generator=gen).to(dt)
        gate = gate if gr == 3 else gate.view(B * T, H * V)
        nw = (1 + 0.3 * torch.randn(V, generator=gen)).to(dt)
    return o, lay["slot"].to(torch.int32), lay["weights"].float(), gate, nw


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_merge_matches_reference(case: tuple) -> None:
    B, T, E, k, sh, H, V, fused, gr, bt, dt, bias = case
    o, slot, w, gate, nw = make_case(case, seed=B * 100 + T)
    out = poison(torch.empty(B, T, H, V, dtype=dt))
    y = merge_prefill(o, slot, w, gate=gate, norm_weight=nw, eps=1e-5,
                      config={"BLOCK_T": bt, "num_warps": 1}, out=out)
    assert y is out and y.dtype == dt
    ref = merge(o.double(), slot.long(), w.double())
    if fused:
        ref = gated_rms_norm(ref, gate.double().reshape(B, T, H, V), nw.double(), 1e-5)
    tol = 1e-4 if dt == torch.float32 else 2e-3
    assert_close("y", y, ref, tol, tol)


def test_merge_int64_slot_strided_o_and_default_config() -> None:
    case = (2, 5, 4, 2, True, 2, 16, True, 2, 8, torch.float32, None)
    o, slot, w, gate, nw = make_case(case, seed=1)
    big = torch.randn(o.shape[0], 3, 16)
    big[:, :2] = o  # o_packed as a strided view (head stride 16, row stride 48)
    y = merge_prefill(big[:, :2], slot.long(), w, gate=gate, norm_weight=nw)
    ref = gated_rms_norm(merge(o.double(), slot.long(), w.double()), gate.double().view(2, 5, 2, 16), nw.double(), 1e-5)
    assert_close("y", y, ref, 1e-4, 1e-4)


def _args(**kw):
    B, T, J, H, V = 1, 4, 3, 2, 16
    a = dict(o_packed=torch.randn(B * T * J, H, V), slot=torch.zeros(B, T, J, dtype=torch.int32),
             weights=torch.rand(B, T, J), gate=torch.randn(B * T, H * V), norm_weight=torch.ones(V))
    a.update(kw)
    return a


def call(**kw):
    a = _args(**kw)
    return merge_prefill(a.pop("o_packed"), a.pop("slot"), a.pop("weights"), **a)


@pytest.mark.parametrize("kw, arg", [
    (dict(o_packed=torch.randn(11, 2, 16)), "o_packed"),
    (dict(o_packed=torch.randn(12, 32)), "o_packed"),
    (dict(slot=torch.zeros(1, 4, 3)), "slot"),
    (dict(weights=torch.rand(1, 4, 3, dtype=torch.float64)), "weights"),
    (dict(weights=torch.rand(1, 4, 2)), "weights"),
    (dict(gate=torch.randn(4, 16)), "gate"),
    (dict(norm_weight=torch.ones(8)), "norm_weight"),
    (dict(norm_weight=None), "norm_weight"),
    (dict(eps=0.0), "eps"),
    (dict(out=torch.empty(1, 4, 2, 8)), "out"),
], ids=["o-rows", "o-rank", "slot-dtype", "weights-dtype", "weights-shape", "gate-shape",
        "norm-weight-shape", "gate-without-weight", "eps", "out-shape"])
def test_bad_inputs_raise(kw: dict, arg: str) -> None:
    with pytest.raises(InputError, match=arg):
        call(**kw)


def test_bad_config_raises() -> None:
    with pytest.raises(ConfigError, match="num_warps"):
        call(config={"num_warps": 3})


def test_merge_search_space() -> None:
    check_space("merge")


@pytest.mark.parametrize("shape", load_space("merge")["shapes"]["tiny"]["shapes"],
                         ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_merge_template_tiny(shape: dict) -> None:
    run_template("merge", shape, torch.float32, "cpu", seed=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", gpu_shapes("merge", ("mom-340m-prefill", "mom-1.3b-prefill")))
def test_merge_template_gpu_bf16(shape: dict) -> None:
    run_template("merge", shape, torch.bfloat16, "cuda", seed=5)
