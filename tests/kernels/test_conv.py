"""Fused gather + segment short conv and gate_prep against momtune.reference.conv / torch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from momtune.errors import ConfigError, InputError
from momtune.kernels.conv import gate_prep, segment_conv
from momtune.kernels.routing.template import distinct_logits, reference_layout
from momtune.reference.conv import short_conv
from tests.helpers import assert_close, poison
from tests.kernels.test_routing import check_space, gpu_shapes, load_space, run_template

# (B, T, E, topk, shared, C, W, src "M" (per memory) / "shared", init window, BLOCK_N, BLOCK_C, bias)
CASES = [
    (2, 13, 4, 2, True, 24, 4, "M", True, 8, 16, None),
    (1, 1, 4, 1, False, 16, 4, "shared", False, 8, 16, None),
    (3, 6, 3, 1, True, 32, 4, "M", True, 4, 32, "empty"),
    (2, 9, 4, 1, True, 20, 3, "shared", True, 16, 8, "one"),
    (1, 7, 3, 3, False, 16, 4, "M", False, 32, 16, None),
    (2, 5, 4, 2, True, 12, 2, "M", False, 8, 16, "empty"),
]


def case_id(c: tuple) -> str:
    B, T, E, k, sh, C, W, src, init, bn, bc, bias = c
    parts = [f"B{B}", f"T{T}", f"E{E}", f"top{k}", "shared" if sh else "noshared", f"C{C}", f"W{W}",
             f"src{src}", "init" if init else "zero-init", f"BN{bn}", f"BC{bc}"]
    return "-".join(parts + ([bias] if bias else []))


def layout(B: int, T: int, E: int, k: int, sh: bool, bias: str | None, gen: torch.Generator) -> dict:
    logits = distinct_logits(B, T, E, torch.float32, "cpu", gen)
    if bias == "empty":
        logits[..., 1] -= 100.0
    elif bias == "one":
        logits[..., 2] += 100.0
    lay = reference_layout(logits, k, sh)
    return {key: lay[key].to(torch.int32) for key in ("token_index", "row_mem", "row_seg", "cu_seqlens")}


def gathered(src: torch.Tensor, lay: dict) -> torch.Tensor:
    tok = lay["token_index"].long()
    return src[tok, lay["row_mem"].long()] if src.dim() == 3 else src[tok]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_segment_conv_matches_reference(case: tuple) -> None:
    B, T, E, k, sh, C, W, src_kind, init, bn, bc, bias = case
    gen = torch.Generator().manual_seed(B * 100 + T * 10 + C)
    lay = layout(B, T, E, k, sh, bias, gen)
    M, S, Np = E + sh, B * (E + sh), lay["token_index"].numel()
    src = torch.randn((B * T, M, C) if src_kind == "M" else (B * T, C), generator=gen)
    weight = 0.5 * torch.randn(C, W, generator=gen)
    iw = torch.randn(S, W - 1, C, generator=gen) if init else None
    fw = poison(torch.empty(S, W - 1, C))
    out = poison(torch.empty(Np, C))
    y = segment_conv(src, weight, lay["token_index"], lay["row_mem"], lay["row_seg"], lay["cu_seqlens"],
                     initial_window=iw, final_window=fw, config={"BLOCK_N": bn, "BLOCK_C": bc, "num_warps": 1},
                     out=out)
    assert y is out
    y_ref, fw_ref = short_conv(gathered(src, lay).double(), weight.double(), lay["cu_seqlens"].long(),
                               None if iw is None else iw.double())
    assert_close("y", y, y_ref, 1e-5, 1e-5)
    assert_close("final_window", fw, fw_ref, 0, 0)
    if init:  # in place: the final windows overwrite the initial ones
        cache = iw.clone()
        y2 = segment_conv(src, weight, lay["token_index"], lay["row_mem"], lay["row_seg"], lay["cu_seqlens"],
                          initial_window=cache, final_window=cache, config={"BLOCK_N": bn, "BLOCK_C": bc})
        assert_close("y in place", y2, y_ref, 1e-5, 1e-5)
        assert_close("window in place", cache, fw_ref, 0, 0)


def test_segment_conv_fp16_int64_indices_no_final_window() -> None:
    gen = torch.Generator().manual_seed(9)
    lay = layout(2, 11, 4, 2, True, None, gen)
    src = torch.randn(22, 5, 64, generator=gen).half()
    weight = (0.5 * torch.randn(64, 4, generator=gen)).half()
    y = segment_conv(src, weight[:, None, :],  # nn.Conv1d weight layout [C, 1, W]
                     *(lay[k].long() for k in ("token_index", "row_mem", "row_seg", "cu_seqlens")))
    assert y.dtype == torch.float16
    y_ref, _ = short_conv(gathered(src, lay).double(), weight.double(), lay["cu_seqlens"].long())
    assert_close("y", y, y_ref, 2e-3, 2e-3)


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gate_prep(src_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    lay = layout(2, 9, 4, 2, True, "empty", gen)
    H = 3
    a = (8 * torch.randn(18, 5, H, generator=gen)).to(src_dtype)  # wide range: both softplus branches
    b = torch.randn(18, 5, H, generator=gen).to(src_dtype)
    A_log, dt_bias = torch.randn(H, generator=gen), torch.randn(H, generator=gen)
    Np = lay["token_index"].numel()
    out = (poison(torch.empty(Np, H)), poison(torch.empty(Np, H, dtype=src_dtype)))
    g, beta = gate_prep(a, b, lay["token_index"], lay["row_mem"], A_log, dt_bias, out=out)
    assert g is out[0] and beta is out[1]
    ga = gathered(a, lay).double() + dt_bias.double()
    g_ref = -A_log.double().exp() * F.softplus(ga)
    assert_close("g", g, g_ref, 1e-6, 1e-5)
    assert_close("beta", beta, gathered(b, lay).double().sigmoid(), 1e-6 if src_dtype == torch.float32 else 1e-3, 1e-3)


def _conv_args(**kw):
    gen = torch.Generator().manual_seed(0)
    lay = layout(1, 4, 4, 2, True, None, gen)
    a = dict(src=torch.randn(4, 5, 16), weight=torch.randn(16, 4), **lay)
    a.update(kw)
    return a


def call_conv(**kw):
    a = _conv_args(**kw)
    pos = [a.pop(k) for k in ("src", "weight", "token_index", "row_mem", "row_seg", "cu_seqlens")]
    return segment_conv(*pos, **a)


@pytest.mark.parametrize("kw, arg", [
    (dict(src=torch.randn(4)), "src"),
    (dict(src=torch.randint(0, 2, (4, 16))), "src"),
    (dict(weight=torch.randn(8, 4)), "weight"),
    (dict(weight=torch.randn(16, 2, 4)), "weight"),
    (dict(token_index=torch.zeros(12)), "token_index"),
    (dict(row_mem=torch.zeros(11, dtype=torch.int32)), "row_mem"),
    (dict(row_seg=torch.zeros(12, 1, dtype=torch.int32)), "row_seg"),
    (dict(cu_seqlens=torch.zeros(1, dtype=torch.int32)), "cu_seqlens"),
    (dict(initial_window=torch.zeros(5, 4, 16)), "initial_window"),
    (dict(final_window=torch.zeros(5, 3, 8)), "final_window"),
    (dict(out=torch.zeros(12, 8)), "out"),
], ids=["src-rank", "src-dtype", "weight-C", "weight-rank", "index-dtype", "row-mem-len", "row-seg-rank",
        "cu-short", "init-shape", "final-shape", "out-shape"])
def test_conv_bad_inputs_raise(kw: dict, arg: str) -> None:
    with pytest.raises(InputError, match=arg):
        call_conv(**kw)


def test_gate_prep_bad_inputs_raise() -> None:
    a = torch.randn(4, 5, 2)
    idx = torch.zeros(6, dtype=torch.int32)
    with pytest.raises(InputError, match="b_all"):
        gate_prep(a, torch.randn(4, 5, 3), idx, idx, torch.zeros(2), torch.zeros(2))
    with pytest.raises(InputError, match="A_log"):
        gate_prep(a, a, idx, idx, torch.zeros(3), torch.zeros(2))
    with pytest.raises(InputError, match="row_mem"):
        gate_prep(a, a, idx, idx[:5], torch.zeros(2), torch.zeros(2))
    with pytest.raises(InputError, match=r"out\[1\]"):
        gate_prep(a, a, idx, idx, torch.zeros(2), torch.zeros(2), out=(torch.empty(6, 2), torch.empty(6, 2).half()))


def test_bad_config_raises() -> None:
    with pytest.raises(ConfigError, match="BLOCK_C"):
        call_conv(config={"BLOCK_C": 100})


def test_conv_search_space() -> None:
    check_space("conv")


@pytest.mark.parametrize("shape", load_space("conv")["shapes"]["tiny"]["shapes"],
                         ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_conv_template_tiny(shape: dict) -> None:
    run_template("conv", shape, torch.float32, "cpu", seed=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", gpu_shapes("conv", ("mom-340m-prefill", "mom-1.3b-prefill")))
def test_conv_template_gpu_bf16(shape: dict) -> None:
    run_template("conv", shape, torch.bfloat16, "cuda", seed=4)
