"""Chunked varlen recurrence (kernels/recurrence) against the float64 token-by-token reference.

CPU: TRITON_INTERPRET=1, tiny shapes, float32 / float16. GPU (@pytest.mark.gpu): the real shape
sets in bfloat16, relative error norm ||out - ref|| / ||ref|| <= 1e-2.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from momtune.errors import ConfigError, InputError
from momtune.kernels import get_template
from momtune.kernels.recurrence.chunk import chunk_recurrence
from momtune.reference.recurrence import recurrent_naive
from tests.helpers import assert_close, poison
from tests.kernels.test_routing import check_space, gpu_shapes, load_space


def load_space_obj():
    from momtune.space import load_space as load

    return load("recurrence")

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3)}
DT = {torch.float32: "fp32", torch.float16: "fp16"}
D, L = "gated_delta", "gated_linear"
FUSED16 = dict(BT=16, PREPASS=False, BV=16)
PRE16 = dict(BT=16, PREPASS=True, BK=16, BV=16)
PRE16_QK = dict(BT=16, PREPASS=True, PRE_QK=True, BK=16, BV=32, num_stages=1)
PRE32_FWD = dict(BT=32, PREPASS=True, SOLVE="forward", WU_FP32=True)
FUSED32_FWD = dict(BT=32, PREPASS=False, SOLVE="forward", BV=16)
FUSED32 = dict(BT=32, PREPASS=False)
# STATES="memory": state pass stores S_c per chunk slot + vnew, chunk-parallel output kernel
MEM16 = dict(BT=16, BK=16, BV=16, STATES="memory")
MEM16_QK = dict(BT=16, BK=16, BV=32, PRE_QK=True, STATES="memory", num_stages=1)
MEM32_H32 = dict(BT=32, BV=16, STATES="memory", H_FP32=True)
MEM32_FWD = dict(BT=32, STATES="memory", SOLVE="forward", WU_FP32=True, PRE_QK=True)

# (segment lengths, H, K, V, rule, dtype, initial state, scale, config)
CASES = [
    ([0, 1, 20, 16], 2, 16, 32, D, torch.float32, True, None, FUSED16),
    ([0, 1, 20, 16], 2, 16, 32, D, torch.float32, True, None, PRE16),
    ([0, 1, 20, 16], 2, 16, 32, D, torch.float32, True, None, PRE16_QK),
    ([0, 1, 20, 16], 2, 16, 32, D, torch.float32, True, 0.3, PRE32_FWD),
    ([0, 1, 20, 16], 2, 16, 32, D, torch.float32, False, None, FUSED32_FWD),
    ([45], 1, 32, 16, D, torch.float32, True, None, PRE16),       # one segment holds every token
    ([45], 1, 32, 16, D, torch.float32, False, 0.5, FUSED32),
    ([3, 0, 33, 1, 0, 9, 0], 1, 16, 16, D, torch.float32, True, None, dict(BT=16)),  # default otherwise
    ([3, 0, 33, 1, 0, 9, 0], 1, 16, 16, D, torch.float32, False, None, FUSED16),
    ([5, 35], 1, 24, 20, D, torch.float32, True, None, dict(BT=16, BK=16)),     # K, V not powers of 2
    ([5, 35], 1, 24, 20, D, torch.float32, True, None, dict(BT=32, PREPASS=False, BV=16)),
    ([0, 1, 50, 29], 2, 32, 32, D, torch.float32, True, None, dict(BT=32, BV=16)),  # several chunks
    ([16, 32, 0], 1, 16, 16, D, torch.float32, True, None, PRE16),  # lengths multiple of BT
    ([16, 32, 0], 1, 16, 16, D, torch.float32, True, None, FUSED16),
    ([0, 1, 20, 16], 2, 16, 32, L, torch.float32, True, None, FUSED16),
    ([0, 1, 50, 29], 2, 32, 32, L, torch.float32, False, None, FUSED32),
    ([0, 1, 20, 16], 2, 16, 32, L, torch.float32, False, 0.3, PRE16),
    ([0, 1, 20, 16], 2, 16, 32, L, torch.float32, True, None, PRE16_QK),
    ([45], 1, 32, 16, L, torch.float32, True, None, dict(BT=32)),
    ([1, 39], 2, 16, 16, D, torch.float16, True, None, FUSED16),
    ([1, 39], 2, 16, 16, D, torch.float16, False, None, PRE16),
    ([1, 39], 2, 16, 16, L, torch.float16, True, None, PRE16_QK),
    ([1, 39], 2, 16, 16, D, torch.float16, True, 0.3, FUSED32),
    # STATES="memory", the same ragged cases
    ([0, 1, 20, 16], 2, 16, 32, D, torch.float32, True, None, MEM16),
    ([0, 1, 20, 16], 2, 16, 32, D, torch.float32, False, 0.3, MEM16_QK),
    ([0, 1, 20, 16], 2, 16, 32, D, torch.float32, True, None, MEM32_FWD),
    ([45], 1, 32, 16, D, torch.float32, True, None, MEM32_H32),     # one segment holds every token
    ([3, 0, 33, 1, 0, 9, 0], 1, 16, 16, D, torch.float32, True, None, MEM16),
    ([5, 35], 1, 24, 20, D, torch.float32, True, None, dict(BT=16, BK=16, STATES="memory")),  # K, V not 2^n
    ([0, 1, 50, 29], 2, 32, 32, D, torch.float32, True, None, MEM32_H32),  # several chunks
    ([16, 32, 0], 1, 16, 16, D, torch.float32, False, None, MEM16),  # lengths multiple of BT
    ([0, 1, 20, 16], 2, 16, 32, L, torch.float32, True, None, MEM16),
    ([0, 1, 50, 29], 2, 32, 32, L, torch.float32, False, None, MEM32_FWD),
    ([1, 39], 2, 16, 16, D, torch.float16, True, None, MEM16),
    ([1, 39], 2, 16, 16, D, torch.float16, False, 0.3, MEM32_H32),
    ([1, 39], 2, 16, 16, L, torch.float16, True, None, MEM16_QK),
    # STATE_LAYOUT="VK" (the transposed state pass), register and memory states, the same ragged cases
    ([0, 1, 20, 16], 2, 16, 32, D, torch.float32, True, None, dict(PRE16, STATE_LAYOUT="VK")),
    ([0, 1, 20, 16], 2, 16, 32, D, torch.float32, False, 0.3, dict(PRE16_QK, STATE_LAYOUT="VK")),
    ([0, 1, 20, 16], 2, 16, 32, D, torch.float32, True, None, dict(MEM16, STATE_LAYOUT="VK")),
    ([0, 1, 20, 16], 2, 16, 32, D, torch.float32, True, None, dict(MEM16_QK, STATE_LAYOUT="VK")),
    ([3, 0, 33, 1, 0, 9, 0], 1, 16, 16, D, torch.float32, True, None, dict(BT=16, STATE_LAYOUT="VK")),
    ([5, 35], 1, 24, 20, D, torch.float32, True, None, dict(BT=16, BK=16, STATE_LAYOUT="VK")),  # K, V not 2^n
    ([5, 35], 1, 24, 20, D, torch.float32, False, None, dict(BT=16, BK=16, STATES="memory", STATE_LAYOUT="VK")),
    ([0, 1, 50, 29], 2, 32, 32, D, torch.float32, True, None, dict(BT=32, BV=16, STATE_LAYOUT="VK")),
    ([0, 1, 50, 29], 2, 32, 32, D, torch.float32, True, None, dict(MEM32_H32, STATE_LAYOUT="VK")),
    ([16, 32, 0], 1, 16, 16, D, torch.float32, True, None, dict(PRE16, STATE_LAYOUT="VK")),
    ([0, 1, 20, 16], 2, 16, 32, L, torch.float32, True, None, dict(PRE16_QK, STATE_LAYOUT="VK")),
    ([0, 1, 50, 29], 2, 32, 32, L, torch.float32, False, None, dict(MEM32_FWD, STATE_LAYOUT="VK")),
    ([1, 39], 2, 16, 16, D, torch.float16, False, None, dict(PRE16, STATE_LAYOUT="VK")),
    ([1, 39], 2, 16, 16, L, torch.float16, True, None, dict(MEM16_QK, STATE_LAYOUT="VK")),
]


def cfg_id(cfg: dict) -> str:
    mode = "fused" if cfg.get("PREPASS") is False else ("preqk" if cfg.get("PRE_QK") else "pre")
    extra = [f"BV{cfg['BV']}"] if "BV" in cfg else []
    extra += ["fwd"] if cfg.get("SOLVE") == "forward" else []
    extra += ["wu32"] if cfg.get("WU_FP32") else []
    extra += ["mem"] if cfg.get("STATES") == "memory" else []
    extra += ["h32"] if cfg.get("H_FP32") else []
    extra += ["vk"] if cfg.get("STATE_LAYOUT") == "VK" else []
    return "-".join([f"BT{cfg['BT']}", mode, *extra])


def case_id(c: tuple) -> str:
    lens, h, k, v, rule, dt, init, scale, cfg = c
    parts = [f"N{sum(lens)}", f"S{len(lens)}", f"H{h}", f"K{k}", f"V{v}", DT[dt],
             "delta" if rule == D else "linear", "h0" if init else "noh0",
             f"scale{scale}" if scale is not None else "scaledef", cfg_id(cfg)]
    return "-".join(parts)


def make_case(lens, h, k, v, dt, init, seed):
    gen = torch.Generator().manual_seed(seed)
    n, s = sum(lens), len(lens)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    q = torch.randn(n, h, k, generator=gen).to(dt)
    kk = torch.randn(n, h, k, generator=gen).to(dt)
    vv = torch.randn(n, h, v, generator=gen).to(dt)
    g = torch.nn.functional.logsigmoid(torch.randn(n, h, generator=gen)).clamp(min=-5.0)
    beta = torch.sigmoid(torch.randn(n, h, generator=gen)).to(dt)
    h0 = torch.randn(s, h, k, v, generator=gen) if init else None
    return q, kk, vv, g, beta, cu, h0


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_recurrence_matches_reference(case: tuple) -> None:
    lens, h, k, v, rule, dt, init, scale, cfg = case
    q, kk, vv, g, beta, cu, h0 = make_case(lens, h, k, v, dt, init, zlib.crc32(case_id(case).encode()))
    out = poison(torch.empty(sum(lens), h, v, dtype=dt))
    fin = poison(torch.empty(len(lens), h, k, v, dtype=torch.float32))
    o, f = chunk_recurrence(q, kk, vv, g, beta if rule == D else None, cu, rule=rule, scale=scale,
                            initial_state=h0, config=cfg, out=out, final_state=fin)
    assert o is out and f is fin and o.dtype == dt
    ref_o, ref_f = recurrent_naive(
        q.double(), kk.double(), vv.double(), g.double(), beta.double(), cu_seqlens=cu, rule=rule,
        scale=scale, initial_state=None if h0 is None else h0.double())
    atol, rtol = TOL[dt]
    assert_close("o", o, ref_o, atol, rtol)
    assert_close("final_state", f, ref_f, atol, rtol)


@pytest.mark.parametrize("states", ["register", "memory"])
def test_recurrence_no_l2norm_no_final_state(states: str) -> None:
    q, kk, vv, g, beta, cu, h0 = make_case([7, 30], 1, 16, 16, torch.float32, True, seed=5)
    q, kk = q * 0.2, kk * 0.2  # keep the un-normalised delta rule stable
    o, f = chunk_recurrence(q, kk, vv, g, beta, cu, initial_state=h0, use_qk_l2norm=False,
                            output_final_state=False, config=dict(BT=16, STATES=states))
    assert f is None
    ref_o, _ = recurrent_naive(q.double(), kk.double(), vv.double(), g.double(), beta.double(),
                               cu_seqlens=cu, initial_state=h0.double(), use_qk_l2norm=False)
    assert_close("o", o, ref_o, *TOL[torch.float32])


def test_recurrence_memory_state_pass_never_reads_q() -> None:
    """STATES="memory": q NaN while the state pass runs still gives the exact final state and o."""
    from momtune.kernels.recurrence.chunk import plan, resolve_config

    lens, h, k, v = [0, 1, 50, 29], 2, 16, 16
    q, kk, vv, g, beta, cu, h0 = make_case(lens, h, k, v, torch.float32, True, seed=7)
    out = poison(torch.empty(sum(lens), h, v))
    fin = poison(torch.empty(len(lens), h, k, v))
    cfg = resolve_config(dict(MEM16), torch.float32)
    pre, state, output = plan(q, kk, vv, g, beta, cu, out, fin, h0, True, k ** -0.5, True, cfg)
    pre()
    q_saved = q.clone()
    q.fill_(float("nan"))
    state()
    q.copy_(q_saved)
    output()
    ref_o, ref_f = recurrent_naive(q.double(), kk.double(), vv.double(), g.double(), beta.double(),
                                   cu_seqlens=cu, initial_state=h0.double())
    assert_close("final_state", fin, ref_f, *TOL[torch.float32])
    assert_close("o", out, ref_o, *TOL[torch.float32])


def test_recurrence_bad_inputs() -> None:
    q, kk, vv, g, beta, cu, h0 = make_case([4, 6], 1, 16, 16, torch.float32, True, seed=1)

    def call(**kw):
        pos = [kw.pop(name, default) for name, default in
               (("q", q), ("k", kk), ("v", vv), ("g", g), ("beta", beta), ("cu_seqlens", cu))]
        return chunk_recurrence(*pos, **kw)

    bad = [
        (dict(k=kk[:, :, :8]), "k"), (dict(v=vv.half()), "v"), (dict(g=g[:, None]), "g"),
        (dict(beta=None), "beta"), (dict(cu_seqlens=cu.float()), "cu_seqlens"),
        (dict(cu_seqlens=cu[:1]), "cu_seqlens"), (dict(initial_state=h0[:1]), "initial_state"),
        (dict(rule="delta"), "rule"), (dict(q=q.double()), "q"), (dict(q=q[0]), "q"),
        (dict(out=torch.empty(3)), "out"), (dict(final_state=h0.half()), "final_state"),
    ]
    for kw, name in bad:
        with pytest.raises(InputError, match=rf"^{name}\b"):
            call(**kw)
    big = torch.randn(10, 1, 300)
    with pytest.raises(InputError, match=r"^q: key size"):
        chunk_recurrence(big, big, vv, g, beta, cu)
    with pytest.raises(ConfigError, match="BQ"):
        call(config={"BQ": 16})
    with pytest.raises(ConfigError, match="BT"):
        call(config={"BT": 48})
    with pytest.raises(ConfigError, match="STATES"):
        call(config={"STATES": "hbm"})
    with pytest.raises(ConfigError, match="PREPASS"):
        call(config={"STATES": "memory", "PREPASS": False})
    with pytest.raises(ConfigError, match="STATE_LAYOUT='VK' needs PREPASS"):
        call(config={"STATE_LAYOUT": "VK", "PREPASS": False})
    with pytest.raises(ConfigError, match="STATE_LAYOUT"):
        call(config={"STATE_LAYOUT": "vk"})


def test_recurrence_search_space_and_template() -> None:
    check_space("recurrence")
    space = load_space("recurrence")
    assert {"fla-varlen", "mom-340m-prefill", "mom-1.3b-prefill"} <= set(space["shapes"])
    tmpl = get_template("recurrence")
    for kv in (16, 32, 64, 128, 256):  # the default runs every supported K, V
        assert tmpl.check_config(dict(N=9, S=2, H=1, K=kv, V=kv), tmpl.default_config) == ""
    assert tmpl.check_config(dict(N=9, S=2, H=1, K=256, V=256), dict(PREPASS=False, BT=64)) != ""
    big = dict(N=9, S=2, H=1, K=256, V=256)
    for kv in (16, 64, 256):  # the memory default (the default with STATES="memory") runs every K, V
        assert tmpl.check_config(dict(N=9, S=2, H=1, K=kv, V=kv), dict(STATES="memory")) == ""
    assert "PREPASS" in tmpl.check_config(big, dict(STATES="memory", PREPASS=False))
    assert "PREPASS" in tmpl.check_config(big, dict(STATE_LAYOUT="VK", PREPASS=False, BT=32))
    ok, why = load_space_obj().is_valid(dict(tmpl.default_config, STATE_LAYOUT="VK", PREPASS=False, BT=32), big)
    assert not ok and "VK" in why
    # 240 KiB of shared memory when compiled for sm_90 (tests/kernels/test_compile_resources.py)
    assert tmpl.check_config(big, dict(STATES="memory", num_stages=3, PRE_QK=True)) != ""
    assert tmpl.check_config(big, dict(STATES="memory", num_stages=3)) == ""  # 208.5 KiB
    assert tmpl.check_config(big, dict(STATES="memory", WU_FP32=True)) != ""  # 240 KiB
    ok, why = load_space_obj().is_valid(dict(tmpl.default_config, STATES="memory", H_FP32=True), big)
    assert ok, why
    assert not load_space_obj().is_valid(dict(tmpl.default_config, H_FP32=True), big)[0]
    flops, nbytes = tmpl.cost(dict(N=32768, S=8, H=4, K=256, V=256), torch.bfloat16)
    assert flops == 32768 * 4 * (2 * 64 * (3 * 256 + 2 * 256) + 6 * 256 * 256)
    assert nbytes == 32768 * 4 * ((4 * 256 + 1) * 2 + 4) + 2 * 8 * 4 * 256 * 256 * 4
    inp = tmpl.make_inputs(dict(N=50, S=6, H=1, K=16, V=16), torch.float32, "cpu", 3)
    lens = (inp["cu_seqlens"][1:] - inp["cu_seqlens"][:-1]).tolist()
    assert sum(lens) == 50 and 0 in lens and 1 in lens and inp["cu_seqlens"].dtype == torch.int32


def test_recurrence_fallbacks_are_valid_everywhere() -> None:
    """Every fallback (over each dtype's default) runs on every shape of every shape set and every
    supported K = V (the template's checks), and is a config of the search space on the model
    shapes (the space also rules out redundant ones, e.g. BV > V on the tiny shapes)."""
    tmpl, space = get_template("recurrence"), load_space_obj()
    assert tmpl.fallbacks
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for fb in tmpl.fallbacks:
            cfg = {**tmpl.default_for(dtype), **fb}
            assert cfg != tmpl.default_for(dtype)
            shapes = [s for sset in space.shape_sets.values() for s in sset.shapes]
            shapes += [dict(N=9, S=2, H=1, K=kv, V=kv) for kv in (16, 32, 64, 128, 256)]
            for shape in shapes:
                assert tmpl.check_config(shape, cfg) == "", (cfg, shape)
            for name in ("mom-340m-prefill", "mom-1.3b-prefill", "fla-varlen"):
                for shape in space.shape_sets[name].shapes:
                    ok, why = space.is_valid(cfg, shape)
                    assert ok, (cfg, shape, why)


@pytest.mark.parametrize("states", ["register", "memory"])
@pytest.mark.parametrize("shape", load_space("recurrence")["shapes"]["tiny"]["shapes"],
                         ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()) + "-fp32-default")
def test_recurrence_template_tiny(shape: dict, states: str) -> None:
    tmpl = get_template("recurrence")
    inputs = tmpl.make_inputs(shape, torch.float32, "cpu", 17)
    ref = tmpl.reference(inputs)
    out = {"o": poison(torch.empty_like(ref["o"], dtype=torch.float32)),
           "final_state": poison(torch.empty_like(ref["final_state"], dtype=torch.float32))}
    got = tmpl.launch(inputs, dict(tmpl.default_config, BT=16, STATES=states), out=out)
    for key in ref:
        assert got[key] is out[key]
        assert_close(key, got[key], ref[key], *tmpl.tolerance(torch.float32))


# ----------------------------------------------------------------------------- GPU (bf16)

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


GPU_CONFIGS = [{}, dict(PRE_QK=True, num_stages=1), dict(BV=32), dict(STATES="memory"),
               dict(STATES="memory", H_FP32=True, PRE_QK=True, num_stages=1)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", gpu_shapes("recurrence", ("mom-340m-prefill", "mom-1.3b-prefill", "fla-varlen")))
def test_recurrence_gpu_bf16(shape: dict) -> None:
    """bf16 on the real shapes: ||o - ref|| / ||ref|| <= 1e-2, same for the final state."""
    tmpl = get_template("recurrence")
    inputs = tmpl.make_inputs(shape, torch.bfloat16, "cuda", 23)
    ref = tmpl.reference(inputs)
    for cfg in GPU_CONFIGS:
        out = {"o": poison(torch.empty_like(inputs["v"])),
               "final_state": poison(torch.empty_like(inputs["initial_state"]))}
        got = tmpl.launch(inputs, cfg, out=out)
        for key in ref:
            assert got[key] is out[key]
            assert not torch.isnan(got[key]).any(), f"{key}: NaN (unwritten) with {cfg}"
            assert rel_err(got[key], ref[key]) <= 1e-2, (key, cfg, rel_err(got[key], ref[key]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv", [(16, 16), (32, 32), (64, 64), (128, 128), (256, 32), (32, 256), (256, 256)],
                         ids=lambda kv: f"N700-S5-H2-K{kv[0]}-V{kv[1]}-bf16")
@pytest.mark.parametrize("rule", [D, L], ids=["delta", "linear"])
def test_recurrence_gpu_default_every_size(kv: tuple, rule: str) -> None:
    """The default config on every supported K, V (bf16, ragged segments with empty / length 1)."""
    tmpl = get_template("recurrence")
    inputs = tmpl.make_inputs(dict(N=700, S=5, H=2, K=kv[0], V=kv[1]), torch.bfloat16, "cuda", 29)
    inputs["rule"] = rule
    ref = tmpl.reference(inputs)
    got = tmpl.launch(inputs, None)
    for key in ref:
        assert rel_err(got[key], ref[key]) <= 1e-2, (key, rel_err(got[key], ref[key]))


def _parallel_keys_case(n: int, seed: int):
    """Keys within 1% of one direction, beta near 1, almost no decay: A is nearly the all-ones
    strict lower triangle, whose inverse (I + A)^-1 is bidiagonal while A's powers grow like
    binomial coefficients. A trained LM makes such chunks (repeated tokens give equal keys)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 1, 32, generator=gen)
    k = base + 0.01 * torch.randn(n, 1, 32, generator=gen)
    q = torch.randn(n, 1, 32, generator=gen)
    v = torch.randn(n, 1, 32, generator=gen)
    g = torch.full((n, 1), -1e-3)
    beta = 0.95 + 0.04 * torch.rand(n, 1, generator=gen)
    return q, k, v, g, beta, torch.tensor([0, n], dtype=torch.int32)


@pytest.mark.parametrize("cfg", [dict(BT=64, BK=32, BV=32), dict(BT=64, BK=32, BV=32, SOLVE="forward"),
                                 dict(BT=32, BV=32, PREPASS=False), dict(BT=64, BK=32, BV=32, STATES="memory")],
                         ids=lambda c: cfg_id({"BT": c["BT"], **c}))
def test_recurrence_stays_accurate_with_nearly_parallel_keys(cfg: dict) -> None:
    """float32 kernel within 4x the float32 token-by-token reference's own error from float64
    (the T solve must be stable: the old product form gave outputs of 1e18 here)."""
    q, k, v, g, beta, cu = _parallel_keys_case(128, seed=11)
    out = poison(torch.empty(128, 1, 32))
    o, _ = chunk_recurrence(q, k, v, g, beta, cu, config=cfg, out=out)
    ref64, _ = recurrent_naive(q.double(), k.double(), v.double(), g.double(), beta.double(), cu_seqlens=cu)
    ref32, _ = recurrent_naive(q, k, v, g, beta, cu_seqlens=cu)

    def rel(a):
        return float((a.double() - ref64).norm() / ref64.norm())

    assert rel(o) <= 4 * rel(ref32), f"kernel {rel(o):.3e}, float32 reference {rel(ref32):.3e}"


def test_float32_dots_follow_torchs_tf32_setting() -> None:
    """float32 inputs run IEEE dots unless torch allows TF32 for float32 matmuls, as torch's own
    matmuls do (issue 12: the kernels used TF32 silently); bf16 and fp16 always run TF32 dots."""
    from momtune.kernels.recurrence.chunk import dot_precision, kernel_specs, resolve_config
    from momtune.layer_check import tf32_matmuls

    with tf32_matmuls(False):
        assert dot_precision(torch.float32) == "ieee"
        assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "tf32"
    with tf32_matmuls(True):
        assert dot_precision(torch.float32) == "tf32"
    specs = kernel_specs(resolve_config({"STATES": "memory"}), n=64, s=1, h=1, kd=16, vd=16, dot="ieee")
    assert {sp.const["DOT"] for sp in specs.values()} == {"ieee"} and len(specs) == 3


@pytest.mark.parametrize("env,torch_tf32,want", [("ieee", True, "ieee"), ("tf32", False, "tf32"),
                                                 ("auto", True, "tf32"), ("auto", False, "ieee"), ("", False, "ieee")])
def test_float32_precision_is_a_setting(monkeypatch: pytest.MonkeyPatch, env: str, torch_tf32: bool, want: str) -> None:
    """MOMTUNE_FP32_PRECISION picks the float32 inputs' dots whatever torch allows (ieee, tf32);
    auto (or unset) follows torch; the correctness gate derives its bounds from the same choice."""
    from momtune.kernels.recurrence.chunk import dot_precision
    from momtune.layer_check import tf32_matmuls
    from momtune.settings import fp32_uses_tf32

    monkeypatch.setenv("MOMTUNE_FP32_PRECISION", env) if env else monkeypatch.delenv("MOMTUNE_FP32_PRECISION",
                                                                                    raising=False)
    with tf32_matmuls(torch_tf32):
        assert dot_precision(torch.float32) == want and fp32_uses_tf32() == (want == "tf32")
        assert dot_precision(torch.bfloat16) == "tf32"


def test_a_bad_float32_precision_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from momtune.errors import ConfigError
    from momtune.kernels.recurrence.chunk import dot_precision

    monkeypatch.setenv("MOMTUNE_FP32_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="MOMTUNE_FP32_PRECISION='fp16' is not accepted; use one of auto, ieee, tf32"):
        dot_precision(torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_recurrence_gpu_float32_is_as_accurate_as_torch_float32(tf32: bool) -> None:
    """float32 on the GPU: with torch's default (IEEE float32 matmuls) within 4x the float32
    reference's own error from float64; with TF32 allowed, the kernels' dots run in TF32 and the
    tuner's gate applies (momtune.gate: 4x the float32 reference, its matmuls in TF32, rounded to
    TF32's significand) -- a TF32 kernel is not held to the chunked reference, whose triangular
    solve stays IEEE float32 whatever torch allows."""
    from momtune.gate import bounds_for, check
    from momtune.layer_check import tf32_matmuls

    tmpl = get_template("recurrence")
    inputs = tmpl.make_inputs(dict(N=700, S=5, H=2, K=128, V=128), torch.float32, "cuda", 31)
    ref = tmpl.reference(inputs)
    with tf32_matmuls(tf32):
        ref32 = tmpl.reference(inputs, dtype=torch.float32)
        got = tmpl.launch(inputs, None)
        bounds = bounds_for(tmpl, inputs, ref, got, torch.float32, "cuda")
    errs = {key: (rel_err(got[key], ref[key]), rel_err(ref32[key], ref[key])) for key in ref}
    print("kernel, float32 reference (norm-wise from float64):", errs, "gate:", bounds)
    if tf32:
        verdict = check(got, ref, bounds)
        assert verdict.ok, (verdict.reason, errs)
    else:
        for key, (e_got, e_ref) in errs.items():
            assert e_got <= 4 * max(e_ref, 1e-7), (key, e_got, e_ref)
