"""Routing + grouping kernels (momtune.kernels.routing) against momtune.reference.routing."""
from __future__ import annotations

import tomllib
from importlib import resources

import pytest
import torch

from momtune.errors import ConfigError, InputError
from momtune.kernels import get_template
from momtune.kernels.routing import RoutingResult, gather_rows, route_and_group, route_topk
from momtune.kernels.routing.template import distinct_logits, reference_layout
from tests.helpers import assert_close, poison

INTS = ("idx", "cu_seqlens", "slot", "token_index", "row_mem", "row_seg")

# (B, T, E, topk, shared, BLOCK_T, bias): bias "empty" = memory 1 never picked,
# "one" = every token's top-1 is memory 2
CASES = [
    (2, 13, 4, 2, True, 8, None),
    (1, 1, 4, 4, False, 16, None),
    (3, 40, 3, 1, True, 16, "empty"),
    (2, 37, 5, 3, False, 4, None),
    (2, 9, 4, 1, True, 4, "one"),
    (1, 20, 6, 6, True, 32, None),
]


def case_id(c: tuple) -> str:
    B, T, E, k, sh, bt, bias = c
    return f"B{B}-T{T}-E{E}-top{k}-{'shared' if sh else 'noshared'}-BT{bt}" + (f"-{bias}" if bias else "")


def make_logits(B: int, T: int, E: int, bias: str | None, seed: int, dtype=torch.float32) -> torch.Tensor:
    x = distinct_logits(B, T, E, torch.float32, "cpu", torch.Generator().manual_seed(seed))
    if bias == "empty":
        x[..., 1] -= 100.0
    elif bias == "one":
        x[..., 2] += 100.0
    return x.to(dtype)


def poisoned_out(B: int, T: int, E: int, k: int, sh: bool) -> RoutingResult:
    M, J = E + sh, k + sh
    Np = B * T * J
    i32 = torch.int32
    return RoutingResult(
        poison(torch.empty(B, T, J)), *(poison(torch.empty(s, dtype=i32)) for s in
                                         [(B, T, J), (B * M + 1,), (B, T, J), (Np,), (Np,), (Np,)]))


def check_layout(res: RoutingResult, logits: torch.Tensor, k: int, sh: bool) -> None:
    ref = reference_layout(logits.double(), k, sh)
    assert_close("weights", res.weights, ref["weights"], 1e-5, 1e-5)
    for name in INTS:
        out = getattr(res, name)
        assert out.dtype == torch.int32, name
        assert torch.equal(out.long(), ref[name].long()), f"{name}: {out.tolist()} != {ref[name].tolist()}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_route_and_group_matches_reference(case: tuple) -> None:
    B, T, E, k, sh, bt, bias = case
    logits = make_logits(B, T, E, bias, seed=B * 1000 + T * 10 + E)
    out = poisoned_out(B, T, E, k, sh)
    res = route_and_group(logits, k, shared=sh, config={"BLOCK_T": bt, "num_warps": 1}, out=out)
    assert all(a is b for a, b in zip(res, out)), "outputs must be written into out"
    check_layout(res, logits, k, sh)
    # invariants of the packed layout
    M, J, Np = E + sh, k + sh, B * T * (k + sh)
    cu = res.cu_seqlens.long()
    assert cu[0] == 0 and cu[-1] == Np and bool((cu[1:] >= cu[:-1]).all())
    tok, seg = res.token_index.long(), res.row_seg.long()
    for s in range(B * M):
        rows = tok[cu[s]:cu[s + 1]]
        assert bool((rows[1:] > rows[:-1]).all()), f"segment {s} not in time order"
        assert bool((seg[cu[s]:cu[s + 1]] == s).all())
    flat = torch.arange(B * T).repeat_interleave(J).view(B, T, J)
    assert torch.equal(tok[res.slot.long()], flat)
    assert torch.equal(res.row_mem.long()[res.slot.long()], res.idx.long())
    assert torch.equal(torch.sort(res.slot.flatten().long()).values, torch.arange(Np))
    if bias == "empty":
        assert bool((cu[1::M][: B] == cu[2::M][: B]).all()), "memory 1 segments must be empty"
    if sh:
        assert bool((res.idx[..., -1] == E).all()) and bool((res.weights[..., -1] == 1).all())


@pytest.mark.parametrize("sh", [True, False])
def test_route_topk_from_strided_logits(sh: bool) -> None:
    """The decode routing: weights and idx only, read from a strided view (a column block of the
    fused projection), equal to the reference's and written into the given outputs."""
    B, E, k = 5, 4, 2
    wide = poison(torch.empty(B, 1, 48))
    wide[:, :, 16:16 + E] = make_logits(B, 1, E, None, seed=21)
    logits = wide[:, :, 16:16 + E]
    assert not logits.is_contiguous()
    J = k + sh
    out = {"weights": poison(torch.empty(B, 1, J)), "idx": torch.full((B, 1, J), -7, dtype=torch.int32)}
    weights, idx = route_topk(logits, k, shared=sh, config={"BLOCK_T": 16, "num_warps": 1}, out=out)
    assert weights is out["weights"] and idx is out["idx"]
    ref = reference_layout(logits.contiguous(), k, sh)
    assert_close("weights", weights, ref["weights"], 1e-5, 1e-5)
    assert torch.equal(idx.long(), ref["idx"].long())
    full = route_and_group(logits, k, shared=sh)
    assert torch.equal(idx, full.idx) and torch.equal(weights, full.weights)


MASKED = [  # (B, T, E, topk, shared, BLOCK_T, mask)
    (3, 13, 4, 2, True, 4, "left-pad"),
    (2, 21, 3, 1, False, 8, "holes"),
    (3, 9, 4, 4, True, 16, "empty-row"),
    (2, 5, 4, 2, True, 4, "all-masked"),
    (1, 7, 5, 3, False, 2, "none-masked"),
]


def make_valid(B: int, T: int, kind: str) -> torch.Tensor:
    v = torch.ones(B, T, dtype=torch.bool)
    if kind == "left-pad":
        for b in range(B):
            v[b, :3 * b] = False
    elif kind == "holes":
        v = torch.rand(B, T, generator=torch.Generator().manual_seed(T)) > 0.4
    elif kind == "empty-row":
        v[1] = False
        v[2, 1::3] = False
    elif kind == "all-masked":
        v[:] = False
    return v


@pytest.mark.parametrize("case", MASKED, ids=lambda c: case_id(c[:6] + (None,)) + f"-{c[6]}")
def test_padding_mask_layout(case: tuple) -> None:
    """Padding joins no segment: every output equals the reference layout with the mask (padding
    rows after the segments, in token order, memory 0, segment B*M-1), with outputs poisoned
    first; the slots still form a permutation of all B*T*J rows; route_topk agrees."""
    B, T, E, k, sh, bt, kind = case
    logits = make_logits(B, T, E, None, seed=B * 100 + T)
    valid = make_valid(B, T, kind)
    out = poisoned_out(B, T, E, k, sh)
    cfg = {"BLOCK_T": bt, "num_warps": 1}
    res = route_and_group(logits, k, shared=sh, config=cfg, out=out, valid=valid)
    ref = reference_layout(logits.double(), k, sh, valid)
    assert_close("weights", res.weights, ref["weights"], 1e-5, 1e-5)
    for name in INTS:
        got = getattr(res, name)
        assert torch.equal(got.long(), ref[name].long()), f"{name}: {got.tolist()} != {ref[name].tolist()}"
    J = k + sh
    assert int(res.cu_seqlens[-1]) == int(valid.sum()) * J
    assert torch.equal(torch.sort(res.slot.flatten().long()).values, torch.arange(B * T * J))
    w, i = route_topk(logits, k, shared=sh, config=cfg, valid=valid)
    assert torch.equal(w, res.weights) and torch.equal(i, res.idx)


@pytest.mark.parametrize("lengths", [[5, 0, 1, 9], [13], [0, 0, 3], [1, 1, 1, 1, 1]],
                         ids=["5-0-1-9", "13", "0-0-3", "five-1s"])
@pytest.mark.parametrize("sh", [True, False], ids=["shared", "noshared"])
def test_packed_sequences_layout(lengths: list[int], sh: bool) -> None:
    """seq_offsets: each packed sequence is a row of its own (no padding): every output equals
    the reference layout, outputs poisoned first; rows of sequence i start at J*seq_offsets[i]."""
    E, k = 4, 2
    N = sum(lengths)
    seq = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    logits = make_logits(1, N, E, None, seed=N + len(lengths))
    out = poisoned_out(1, N, E, k, sh)._replace(cu_seqlens=poison(torch.empty(len(lengths) * (E + sh) + 1,
                                                                                dtype=torch.int32)))
    res = route_and_group(logits, k, shared=sh, config={"BLOCK_T": 4, "num_warps": 1}, out=out, seq_offsets=seq)
    ref = reference_layout(logits.double(), k, sh, seq_offsets=seq.long())
    assert_close("weights", res.weights, ref["weights"], 1e-5, 1e-5)
    for name in INTS:
        got = getattr(res, name)
        assert torch.equal(got.long(), ref[name].long()), f"{name}: {got.tolist()} != {ref[name].tolist()}"
    J, M = k + sh, E + sh
    assert res.cu_seqlens[::M].tolist() == (seq * J).tolist()


def test_packed_sequences_are_checked() -> None:
    logits = make_logits(1, 6, 4, None, seed=1)
    with pytest.raises(InputError, match="seq_offsets"):
        route_and_group(logits, 2, shared=True, seq_offsets=torch.tensor([3]))
    with pytest.raises(InputError, match="logits"):
        route_and_group(make_logits(2, 3, 4, None, seed=1), 2, shared=True, seq_offsets=torch.tensor([0, 3]))
    with pytest.raises(InputError, match="valid"):
        route_and_group(logits, 2, shared=True, seq_offsets=torch.tensor([0, 6]),
                        valid=torch.ones(1, 6, dtype=torch.bool))


def test_padding_mask_is_checked() -> None:
    logits = make_logits(2, 5, 4, None, seed=1)
    with pytest.raises(InputError, match="valid"):
        route_and_group(logits, 2, shared=True, valid=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="valid"):
        route_topk(logits, 2, shared=True, valid=torch.ones(2, 5))


def test_count_scan_in_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import momtune.kernels.routing.routing as mod

    monkeypatch.setattr(mod, "SCAN_CHUNK", 4)  # 10 blocks per row -> 3 scan steps
    logits = make_logits(2, 37, 4, "empty", seed=2)
    check_layout(route_and_group(logits, 2, shared=True, config={"BLOCK_T": 4, "num_warps": 1}), logits, 2, True)


def test_padding_mask_with_count_scan_in_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import momtune.kernels.routing.routing as mod

    monkeypatch.setattr(mod, "SCAN_CHUNK", 4)
    logits, valid = make_logits(3, 37, 4, None, seed=4), make_valid(3, 37, "holes")
    res = route_and_group(logits, 2, shared=True, config={"BLOCK_T": 4, "num_warps": 1}, valid=valid)
    ref = reference_layout(logits.double(), 2, True, valid)
    for name in INTS:
        assert torch.equal(getattr(res, name).long(), ref[name].long()), name


def test_route_float16_logits_and_default_config() -> None:
    logits = make_logits(2, 21, 4, None, seed=3, dtype=torch.float16)
    check_layout(route_and_group(logits, 2, shared=True), logits, 2, True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN logits, on purpose
def test_ties_pick_lower_memory_and_nan_keeps_layout_valid() -> None:
    logits = torch.zeros(1, 5, 4)
    logits[0, 1] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    logits[0, 3, 2] = float("nan")
    res = route_and_group(logits, 2, shared=False, config={"BLOCK_T": 16, "num_warps": 1})
    assert res.idx[0, 0].tolist() == [0, 1] and res.idx[0, 1].tolist() == [1, 2]
    assert torch.equal(torch.sort(res.slot.flatten().long()).values, torch.arange(10))
    assert bool(((res.idx >= 0) & (res.idx < 4)).all())


def test_gather_rows() -> None:
    logits = make_logits(2, 11, 4, None, seed=5)
    res = route_and_group(logits, 2, shared=True)
    x = torch.randn(22, 40)
    out = poison(torch.empty(res.token_index.numel(), 40))
    y = gather_rows(x, res.token_index, config={"BLOCK_R": 32, "BLOCK_D": 32, "num_warps": 1}, out=out)
    assert y is out and torch.equal(y, x[res.token_index.long()])


@pytest.mark.parametrize("bad, arg", [
    (lambda: route_and_group(torch.randn(4, 4), 1, shared=False), "logits"),
    (lambda: route_and_group(torch.randint(0, 3, (1, 4, 4)), 1, shared=False), "logits"),
    (lambda: route_and_group(torch.randn(1, 4, 4), 0, shared=False), "topk"),
    (lambda: route_and_group(torch.randn(1, 4, 4), 5, shared=True), "topk"),
    (lambda: route_and_group(torch.randn(1, 4, 4), 2, shared=1), "shared"),
    (lambda: route_and_group(torch.randn(1, 4, 4), 2, shared=True, out={"slot": torch.empty(1, 4, 2, dtype=torch.int32)}), "out.slot"),
    (lambda: gather_rows(torch.randn(4, 8), torch.zeros(3)), "token_index"),
    (lambda: gather_rows(torch.randn(4), torch.zeros(3, dtype=torch.int32)), "x"),
], ids=["logits-rank", "logits-dtype", "topk-0", "topk-gt-E", "shared-int", "out-shape", "index-dtype", "x-rank"])
def test_bad_inputs_raise(bad, arg: str) -> None:
    with pytest.raises(InputError, match=arg):
        bad()


def test_bad_config_raises() -> None:
    with pytest.raises(ConfigError, match="BLOCK_X"):
        route_and_group(torch.randn(1, 4, 4), 2, shared=True, config={"BLOCK_X": 8})
    with pytest.raises(ConfigError, match="BLOCK_T"):
        route_and_group(torch.randn(1, 4, 4), 2, shared=True, config={"BLOCK_T": 12})


def load_space(name: str) -> dict:
    return tomllib.loads((resources.files("momtune.search_spaces") / f"{name}.toml").read_text())


def check_space(name: str) -> None:
    """Defaults = the template's default_config; every constraint holds for the defaults on every
    shape of every set; shape sets use exactly the template's keys."""
    tmpl, space = get_template(name), load_space(name)
    defaults = {k: v["default"] for k, v in space["parameters"].items()}
    assert defaults == dict(tmpl.default_config)
    for sname in ("tiny", "mom-340m-prefill", "mom-1.3b-prefill"):
        assert sname in space["shapes"], sname
    for sset in space["shapes"].values():
        for shape in sset["shapes"]:
            assert set(shape) == set(tmpl.shape_keys)
            for c in space["constraints"]:
                assert eval(c["expr"], {"__builtins__": {}, "min": min, "max": max}, {**shape, **defaults}), c  # noqa: S307
            flops, nbytes = tmpl.cost(shape, torch.bfloat16)
            assert flops > 0 and nbytes > 0


def run_template(name: str, shape: dict, dtype: torch.dtype, device: str, seed: int) -> None:
    tmpl = get_template(name)
    inputs = tmpl.make_inputs(shape, dtype, device, seed)
    ref = tmpl.reference(inputs)
    first = tmpl.launch(inputs, tmpl.default_config)
    out = {k: poison(torch.empty_like(v)) for k, v in first.items()}
    got = tmpl.launch(inputs, tmpl.default_config, out=out)
    atol, rtol = tmpl.tolerance(dtype)
    for key in ref:
        assert got[key] is out[key], f"{key} not written into out"
        assert_close(f"{name}.{key}", got[key], ref[key], atol, rtol)


def test_routing_search_space() -> None:
    check_space("routing")
    assert "decode" in load_space("routing")["shapes"]


@pytest.mark.parametrize("shape", load_space("routing")["shapes"]["tiny"]["shapes"],
                         ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_routing_template_tiny(shape: dict) -> None:
    run_template("routing", shape, torch.float32, "cpu", seed=7)


def gpu_shapes(name: str, sets: tuple[str, ...]) -> list:
    space = load_space(name)
    return [pytest.param(s, id=f"{n}-" + "-".join(f"{k}{v}" for k, v in s.items()))
            for n in sets for s in space["shapes"][n]["shapes"]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", gpu_shapes("routing", ("mom-340m-prefill", "mom-1.3b-prefill", "decode")))
def test_routing_template_gpu_bf16(shape: dict) -> None:
    run_template("routing", shape, torch.bfloat16, "cuda", seed=11)
