"""Decode step kernels (kernels/decode) against the float64 reference step.

CPU: Triton interpreter, float32/float16, tiny shapes. GPU (`-m gpu`): bfloat16, mom-340m shapes.
"""
from __future__ import annotations

import pytest
import torch

from momtune.errors import ConfigError, InputError
from momtune.kernels.decode.step import decode_step
from momtune.kernels.decode.template import CACHE_KEYS, TEMPLATE, make_inputs, reference_step
from tests.helpers import assert_close, poison

RULES = {"delta": "gated_delta", "linear": "gated_linear"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ARG_NAMES = ("q_t", "k_all", "v_all", "a_all", "b_all", "idx", "weights", "state", "conv_q", "conv_k",
             "conv_v", "q_conv_w", "k_conv_w", "v_conv_w", "A_log", "dt_bias")


def shape_of(B, H, K, V, E, topk, shared):
    return dict(B=B, H=H, K=K, V=V, E=E, topk=topk, shared=int(shared))


def case_id(shape, dt, rule, gate, cfg):
    s = shape
    parts = [f"B{s['B']}-H{s['H']}-K{s['K']}-V{s['V']}-E{s['E']}-top{s['topk']}",
             "shared" if s["shared"] else "noshared", dt, rule, "gate" if gate else "nogate"]
    parts += [f"{k}{v}" if k != "merge" else str(v) for k, v in cfg.items()]
    return "-".join(parts)


def build(shape, dt, rule, gate, seed, device="cpu"):
    inp = make_inputs(shape, DTYPES[dt], device, seed)
    inp["rule"] = RULES[rule]
    if not gate:
        inp["gate"] = inp["norm_weight"] = None
    return inp


def step(inp, cache, cfg=None, out=None):
    """decode_step in place on ``cache`` (dict of the four cache tensors)."""
    args = [cache.get(n, inp[n]) for n in ARG_NAMES]
    return decode_step(*args, rule=inp["rule"], scale=inp["scale"], gate=inp["gate"],
                       norm_weight=inp["norm_weight"], eps=inp["eps"], config=cfg, out=out)


def routed_mask(idx, M):
    mask = torch.zeros(idx.shape[0], M, dtype=torch.bool)
    ok = idx.long().cpu() >= 0
    rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)[ok]
    mask[rows, idx.long().cpu()[ok]] = True
    return mask


def check_step(inp, y, cache, ref, before):
    atol, rtol = TEMPLATE.tolerance(inp["q_t"].dtype)
    assert_close("y", y, ref["y"], atol, rtol)
    for key in CACHE_KEYS:
        assert_close(key, cache[key], ref[key], atol, rtol)
    untouched = ~routed_mask(inp["idx"], inp["state"].shape[1])
    for key in CACHE_KEYS:  # memories not routed in a row: bit-identical
        assert torch.equal(cache[key].cpu()[untouched], before[key].cpu()[untouched]), f"{key}: untouched memory changed"


S = shape_of
CASES = [
    (S(3, 2, 16, 32, 4, 2, 1), "fp32", "delta", True, {}),
    (S(2, 2, 16, 32, 4, 2, 1), "fp32", "linear", True, {}),
    (S(3, 2, 16, 32, 4, 2, 0), "fp32", "delta", True, {"merge": "fused", "BV": 16}),
    (S(2, 2, 16, 32, 4, 2, 0), "fp32", "linear", True, {"merge": "fused", "BV": 32}),
    (S(2, 2, 16, 16, 4, 1, 0), "fp32", "delta", False, {"merge": "split", "BV": 8}),
    (S(2, 2, 16, 16, 4, 1, 1), "fp32", "linear", True, {"merge": "fused", "BV": 16}),
    (S(2, 2, 16, 16, 4, 4, 1), "fp32", "delta", True, {"merge": "fused", "BV": 16}),
    (S(2, 2, 16, 32, 4, 4, 0), "fp32", "linear", False, {"merge": "fused", "BV": 16}),
    (S(2, 2, 32, 16, 3, 2, 1), "fp32", "delta", True, {"KSPLIT": 2}),
    (S(2, 2, 32, 16, 3, 2, 1), "fp32", "delta", True, {"KSPLIT": 4, "merge": "fused", "BV": 16}),
    (S(2, 2, 32, 16, 3, 2, 1), "fp32", "linear", False, {"KSPLIT": 2, "merge": "fused", "BV": 8}),
    (S(2, 2, 12, 20, 3, 2, 1), "fp32", "delta", True, {"merge": "fused", "BV": 32}),
    (S(2, 1, 12, 20, 3, 2, 1), "fp32", "delta", True, {"KSPLIT": 2, "BV": 8}),
    (S(1, 1, 16, 16, 2, 1, 1), "fp32", "delta", True, {}),
    (S(2, 2, 16, 32, 4, 2, 1), "fp16", "delta", True, {}),
]


@pytest.mark.parametrize("shape,dt,rule,gate,cfg", CASES, ids=[case_id(*c) for c in CASES])
def test_step_matches_reference(shape, dt, rule, gate, cfg):
    inp = build(shape, dt, rule, gate, seed=len(case_id(shape, dt, rule, gate, cfg)))
    ref = reference_step(inp)
    cache = {k: inp[k].clone() for k in CACHE_KEYS}
    before = {k: v.clone() for k, v in cache.items()}
    y = poison(torch.empty(shape["B"], shape["H"], shape["V"], dtype=inp["q_t"].dtype))
    out = step(inp, cache, cfg, out=y)
    assert out is y
    check_step(inp, y, cache, ref, before)


@pytest.mark.parametrize("rule", ["delta", "linear"])
def test_consecutive_steps(rule):
    """Three in-place steps, fresh tokens and routing each time, equal the reference stepped 3 times."""
    shape = S(2, 1, 16, 16, 4, 2, 1)
    inp = build(shape, "fp32", rule, True, seed=5)
    cache = {k: inp[k].clone() for k in CACHE_KEYS}
    ref_cache = {k: inp[k].clone() for k in CACHE_KEYS}
    for t in range(3):
        fresh = build(shape, "fp32", rule, True, seed=100 + t)
        for key in ("q_t", "k_all", "v_all", "a_all", "b_all", "idx", "weights", "gate"):
            inp[key] = fresh[key]
        ref = reference_step({**inp, **ref_cache})
        before = {k: v.clone() for k, v in cache.items()}
        y = step(inp, cache, {"merge": "fused", "BV": 8} if t % 2 else None)
        check_step({**inp, "state": before["state"]}, y, cache, ref, before)
        ref_cache = {k: ref[k].float() for k in CACHE_KEYS}


def test_empty_slot_is_ignored():
    """idx < 0 marks an empty slot: it contributes nothing and touches no memory."""
    inp = build(S(2, 2, 16, 16, 4, 2, 1), "fp32", "delta", True, seed=7)
    inp["idx"][0, 1] = -1
    ref = reference_step(inp)
    cache = {k: inp[k].clone() for k in CACHE_KEYS}
    before = {k: v.clone() for k, v in cache.items()}
    check_step(inp, step(inp, cache), cache, ref, before)


@pytest.mark.parametrize("shared_slot", [False, True], ids=["per-memory", "stride0-slot"])
def test_strided_views_of_one_projection(shared_slot):
    """q/gate/k/v/a/b as strided views into one wide buffer (the model's fused projection, whose
    row stride and block offsets are not those of contiguous tensors) are read in place and give
    the reference's answer; with a stride-0 memory axis (single_kv_proj) every memory reads the
    same k/v/a/b row."""
    shape = S(3, 2, 16, 32, 4, 2, 1)
    inp = build(shape, "fp32", "delta", True, seed=11)
    B, M = 3, 5
    if shared_slot:
        for key in ("k_all", "v_all", "a_all", "b_all"):
            inp[key] = inp[key][:, :1].expand_as(inp[key]).contiguous()
    widths = {"q_t": 32, "gate": 64, "k_all": 32, "v_all": 64, "a_all": 2, "b_all": 2}
    slot_w = sum(widths[k] + 16 for k in ("k_all", "v_all", "a_all", "b_all"))
    total = 48 + 80 + (1 if shared_slot else M) * slot_w + 5  # padded blocks and an odd row stride
    buf = poison(torch.empty(B, total))
    off = 0
    views = {}
    for key in ("q_t", "gate"):
        views[key] = buf[:, off:off + widths[key]]
        off += widths[key] + 16
    for key in ("k_all", "v_all", "a_all", "b_all"):
        views[key] = buf.as_strided((B, M, widths[key]), (total, 0 if shared_slot else slot_w, 1), off)
        off += widths[key] + 16
    for key, v in views.items():
        v.copy_(inp[key]) if not (shared_slot and v.dim() == 3) else v[:, 0].copy_(inp[key][:, 0])
        assert not v.is_contiguous()
        inp[key] = v
    ref = reference_step(inp)
    cache = {k: inp[k].clone() for k in CACHE_KEYS}
    before = {k: v.clone() for k, v in cache.items()}
    kept = buf.clone()
    check_step(inp, step(inp, cache), cache, ref, before)
    assert torch.equal(buf.nan_to_num(7.0), kept.nan_to_num(7.0))  # inputs only read


def test_conv_width_3():
    """The kernels take the conv width from the weights (W = 3 here; the model uses 4)."""
    inp = build(S(2, 2, 16, 16, 4, 2, 1), "fp32", "delta", True, seed=9)
    for key in ("conv_q", "conv_k", "conv_v"):
        inp[key] = inp[key][:, :, 1:].contiguous()
    for key in ("q_conv_w", "k_conv_w", "v_conv_w"):
        inp[key] = inp[key][:, 1:].contiguous()
    ref = reference_step(inp)
    cache = {k: inp[k].clone() for k in CACHE_KEYS}
    before = {k: v.clone() for k, v in cache.items()}
    check_step(inp, step(inp, cache, {"merge": "fused", "BV": 16}), cache, ref, before)


def test_template_launch_is_idempotent():
    """The template reads the pristine cache and writes the working one: repeated launches agree."""
    shape = S(2, 2, 16, 16, 4, 2, 1)
    inp = TEMPLATE.make_inputs(shape, torch.float32, "cpu", 3)
    pristine = {k: inp[k].clone() for k in CACHE_KEYS}
    ref = TEMPLATE.reference(inp)
    atol, rtol = TEMPLATE.tolerance(torch.float32)
    out = {k: poison(torch.empty_like(ref[k], dtype=inp[k].dtype if k != "y" else inp["q_t"].dtype))
           for k in ref}
    for _ in range(2):
        res = TEMPLATE.launch(inp, TEMPLATE.default_config, out=out)
        for key in ref:
            assert_close(key, res[key], ref[key], atol, rtol)
    first = TEMPLATE.launch(inp, {"merge": "fused", "BV": 16})
    y1 = first["y"].clone()
    second = TEMPLATE.launch(inp, {"merge": "fused", "BV": 16})
    assert torch.equal(second["y"], y1)
    for key in CACHE_KEYS:
        assert torch.equal(inp[key], pristine[key]), f"{key}: pristine cache was written"
        assert_close(key, second[key], ref[key], atol, rtol)
    assert TEMPLATE.check_config(shape, TEMPLATE.default_config) == ""
    flops, nbytes = TEMPLATE.cost(shape, torch.bfloat16)
    assert flops > 0 and nbytes > 2 * 3 * 2 * 16 * 16 * 4 * 2



def test_timed_launch_is_the_in_place_step():
    """What the search times (no copy of the pristine cache into the outputs) gives launch's
    read-out and the same next state in every routed and shared slot; the pristine cache is not written."""
    shape = S(2, 2, 16, 16, 4, 2, 1)
    inp = TEMPLATE.make_inputs(shape, torch.float32, "cpu", 4)
    pristine = {k: inp[k].clone() for k in CACHE_KEYS}
    ref = TEMPLATE.reference(inp)
    atol, rtol = TEMPLATE.tolerance(torch.float32)
    y = poison(torch.empty_like(ref["y"], dtype=inp["q_t"].dtype))
    for key in CACHE_KEYS:
        inp[key + "_next"].fill_(float("nan"))
    res = TEMPLATE.timed_launch(inp, TEMPLATE.default_config, out={"y": y})
    assert res["y"] is y and res["state"] is inp["state_next"]
    assert_close("y", y, ref["y"], atol, rtol)
    touched = ~torch.isnan(res["state"]).flatten(2).all(-1)  # [B, M]: slots the step wrote
    assert touched.sum(1).tolist() == [3, 3]  # top-2 + the shared memory, per sequence
    assert_close("state", res["state"][touched], ref["state"][touched], atol, rtol)
    for key in CACHE_KEYS:
        assert torch.equal(inp[key], pristine[key]), f"{key}: pristine cache was written"


BAD = [
    ("state", lambda a, kw: a.__setitem__("state", a["state"].bfloat16())),
    ("state", lambda a, kw: a.__setitem__("state", a["state"].transpose(3, 4).contiguous().transpose(3, 4))),
    ("idx", lambda a, kw: a.__setitem__("idx", a["idx"].float())),
    ("conv_q", lambda a, kw: a.__setitem__("conv_q", a["conv_q"][:, :, :2])),
    ("k_all", lambda a, kw: a.__setitem__("k_all", a["k_all"][:, :3])),
    ("weights", lambda a, kw: a.__setitem__("weights", a["weights"][:, :1])),
    ("q_conv_w", lambda a, kw: a.__setitem__("q_conv_w", a["q_conv_w"][:16])),
    ("k_conv_w", lambda a, kw: a.__setitem__("k_conv_w", a["k_conv_w"][:, :3])),
    ("norm_weight", lambda a, kw: kw.__setitem__("norm_weight", None)),
    ("rule", lambda a, kw: kw.__setitem__("rule", "delta")),
    ("out", lambda a, kw: kw.__setitem__("out", torch.empty(2, 2, 16, dtype=torch.float16))),
]


@pytest.mark.parametrize("name,mutate", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(name, mutate):
    inp = build(S(2, 2, 16, 16, 4, 2, 1), "fp32", "delta", True, seed=1)
    args = {n: inp[n] for n in ARG_NAMES}
    kw = dict(rule="gated_delta", gate=inp["gate"], norm_weight=inp["norm_weight"])
    mutate(args, kw)
    with pytest.raises(InputError, match=f"^{name}:"):
        decode_step(*args.values(), **kw)


@pytest.mark.parametrize("cfg,key", [({"BV": 12}, "BV"), ({"merge": "atomic"}, "merge"), ({"BQ": 1}, "BQ")])
def test_bad_config_names_the_key(cfg, key):
    inp = build(S(2, 2, 16, 16, 4, 2, 1), "fp32", "delta", False, seed=1)
    with pytest.raises(ConfigError, match=rf"{key}\b"):
        step(inp, {k: inp[k] for k in CACHE_KEYS}, cfg)


# ---------------------------------------------------------------------------------------- GPU
GPU_CONFIGS = [{}, {"merge": "fused", "BV": 32}, {"merge": "fused", "BV": 256, "KSPLIT": 4, "num_warps": 8},
               {"KSPLIT": 2, "BV": 64}]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B", [1, 8, 33])
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("rule", ["delta", "linear"])
def test_gpu_bf16_real_shapes(B, cfg, rule):
    """mom-340m decode shapes in bf16 (H 4, K 256, V 256, E 4, top-2, shared)."""
    shape = S(B, 4, 256, 256, 4, 2, 1)
    inp = build(shape, "bf16", rule, True, seed=B, device="cuda")
    ref = reference_step(inp)
    res = TEMPLATE.launch(inp, cfg, out={"y": poison(torch.empty(B, 4, 256, dtype=torch.bfloat16, device="cuda"))})
    atol, rtol = TEMPLATE.tolerance(torch.bfloat16)
    for key in ref:
        assert_close(key, res[key], ref[key], atol, rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_two_steps():
    """Two steps captured in one CUDA graph equal the reference stepped twice."""
    shape = S(8, 4, 256, 256, 4, 2, 1)
    inp = build(shape, "bf16", "delta", True, seed=2, device="cuda")
    cache = {k: inp[k].clone() for k in CACHE_KEYS}
    y = torch.empty(8, 4, 256, dtype=torch.bfloat16, device="cuda")
    step(inp, {k: v.clone() for k, v in cache.items()}, out=y)  # compile outside the capture
    start = {k: v.clone() for k, v in cache.items()}
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(inp, cache, out=y)
        step(inp, cache, out=y)
    for k in CACHE_KEYS:
        cache[k].copy_(start[k])
    graph.replay()
    torch.cuda.synchronize()
    ref1 = reference_step(inp)
    ref2 = reference_step({**inp, **{k: ref1[k].to(inp[k].dtype) for k in CACHE_KEYS}})
    atol, rtol = TEMPLATE.tolerance(torch.bfloat16)
    assert_close("y", y, ref2["y"], atol, rtol)
    assert_close("state", cache["state"], ref2["state"], atol, rtol)
