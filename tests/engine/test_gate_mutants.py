"""The correctness gate against wrong kernels: every template's launch, mutated the ways a wrong
kernel goes wrong, run through the worker's trial (check run, timing, re-check after timing on
other inputs), is rejected with its failure kind; the unmutated launch passes.

Runs the real kernels (Triton interpreter on the CPU, float32). On a GPU (``-m gpu``) the same
mutants run in bf16 at the first real shape of each template.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from momtune.kernels import get_template, template_names
from momtune.space import load_space
from momtune.timing import TimingOptions
from momtune.worker import _handle

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available() and not INTERP
needs_kernels = pytest.mark.skipif(not INTERP, reason="the CPU suite runs the kernels in Triton's interpreter")


def _floats(out):
    return [v for v in out.values() if v.is_floating_point()]


def _skips_after_check(launch):
    """Computes on its first two calls (the worker's shape probe and the check run); later calls
    return at once, the work skipped: only the re-check after timing can see it."""
    calls = []

    def mutant(inputs, config=None, out=None):
        calls.append(1)
        if len(calls) > 2:
            return out
        return launch(inputs, config, out=out)
    return mutant


def _stale(launch):
    """Computes once, then writes the first answer again on every call (stale outputs)."""
    first = {}

    def mutant(inputs, config=None, out=None):
        if not first:
            res = launch(inputs, config, out=out)
            first.update({k: v.clone() for k, v in res.items()})
            return res
        for k, v in first.items():
            out[k].copy_(v)
        return out
    return mutant


def _after(fn):
    def wrap(launch):
        def mutant(inputs, config=None, out=None):
            res = launch(inputs, config, out=out)
            fn(res)
            return res
        return mutant
    return wrap


def _zero(res):
    for v in _floats(res):
        v.zero_()


def _partial(res):  # the last quarter of every floating output never written
    for v in _floats(res):
        v.view(-1)[3 * v.numel() // 4:] = float("nan")


def _partial_zero(res):  # ... or written as zeros
    for v in _floats(res):
        v.view(-1)[3 * v.numel() // 4:] = 0.0


def _scale(res):  # every floating output 1% off
    for v in _floats(res):
        v.mul_(1.01)


def _with_inputs(change):
    """The launch sees inputs changed by ``change`` (a kernel reading the wrong thing)."""
    def wrap(launch):
        def mutant(inputs, config=None, out=None):
            return launch(change(dict(inputs)), config, out=out)
        return mutant
    return wrap


def _wrong_boundary(inputs):
    """One interior segment boundary of cu_seqlens read one row late."""
    cu = inputs["cu_seqlens"].clone()
    lens = cu[1:] - cu[:-1]
    inner = [i for i in range(1, cu.numel() - 1) if lens[i] > 1]  # boundary i starts a segment of >= 2 rows
    cu[inner[0] if inner else 1] += 1
    inputs["cu_seqlens"] = cu
    return inputs


def _no_interchunk(inputs, bt):
    """Every ``bt``-row chunk of a segment run as its own segment from a zero state: the state
    carried between chunks is dropped (each segment's first piece keeps its initial state)."""
    cu = inputs["cu_seqlens"].tolist()
    pieces, first = [0], []
    for s in range(len(cu) - 1):
        first.append(len(pieces) - 1)
        for start in range(cu[s] + bt, cu[s + 1], bt):
            pieces.append(start)
        pieces.append(cu[s + 1])
    h0 = inputs["initial_state"]
    new = torch.zeros((len(pieces) - 1, *h0.shape[1:]), dtype=h0.dtype, device=h0.device)
    new[first] = h0
    inputs["cu_seqlens"] = torch.tensor(pieces, dtype=torch.int32, device=h0.device)
    inputs["initial_state"] = new
    return inputs


def _drop_interchunk(launch):
    """The kernel's chunks (its config's BT) each from a zero state: the between-chunk term dropped."""
    def mutant(inputs, config=None, out=None):
        split = _no_interchunk(dict(inputs), int((config or {}).get("BT", 64)))
        res = launch(split, config)
        cu = inputs["cu_seqlens"].tolist()
        pieces = split["cu_seqlens"].tolist()
        last = [pieces.index(cu[s + 1]) - 1 if cu[s + 1] > cu[s] else pieces.index(cu[s])
                for s in range(len(cu) - 1)]
        fs = res["final_state"][last]
        for s in range(len(cu) - 1):  # empty segments keep their initial state
            if cu[s + 1] == cu[s]:
                fs[s] = inputs["initial_state"][s]
        if out is None:
            return {"o": res["o"], "final_state": fs}
        out["o"].copy_(res["o"])
        out["final_state"].copy_(fs)
        return out
    return mutant


def _zero_state(key):
    def change(inputs):
        inputs[key] = torch.zeros_like(inputs[key])
        return inputs
    return change


GENERIC = {
    "zeroed": (_after(_zero), {"norm", "elementwise"}),
    "partial-unwritten": (_after(_partial), {"unwritten"}),
    "partial-zero": (_after(_partial_zero), {"norm", "elementwise"}),
    "scale-1pct": (_after(_scale), {"norm", "elementwise"}),
    "work-skipped-after-check": (_skips_after_check, {"unwritten"}),
    "stale-outputs": (_stale, {"norm", "elementwise", "integer_mismatch"}),
}
SPECIFIC = {
    "recurrence": {
        "wrong-segment-boundary": (_with_inputs(_wrong_boundary), {"norm", "elementwise"}),
        "no-interchunk-term": (_drop_interchunk, {"norm", "elementwise"}),
        "stale-state": (_with_inputs(_zero_state("initial_state")), {"norm", "elementwise"}),
    },
    "conv": {"wrong-segment-boundary": (_with_inputs(_wrong_boundary), {"norm", "elementwise", "unwritten"})},
    "conv_bwd": {"wrong-segment-boundary": (_with_inputs(_wrong_boundary), {"norm", "elementwise"})},
    "recurrence_bwd": {"wrong-segment-boundary": (_with_inputs(_wrong_boundary), {"norm", "elementwise"})},
    "decode": {"stale-state": (_with_inputs(_zero_state("state")), {"norm", "elementwise"})},
}
AFTER_TIMING = {"work-skipped-after-check", "stale-outputs"}
CASES = [(name, m) for name in template_names() for m in [*GENERIC, *SPECIFIC.get(name, {})]]


#: CPU: the recurrence (and its backward) in chunks of 16, so that the tiny shapes' segments span
#: several chunks
CPU_CONFIG = {"recurrence": {"BT": 16, "BK": 16, "BV": 16},
              "recurrence_bwd": {"chunk": 16, "block_k": 16, "block_v": 16, "fwd_block_v": 16, "bwd_block_v": 16}}


def _trial(template, dtype, shape, device, seed=3, gpu=False):
    opts = TimingOptions(interpreter=not CUDA, runs=2, warmup_ms=5, rep_ms=10)
    config = {**template.default_for(dtype), **({} if gpu else CPU_CONFIG.get(template.name.split("~")[0], {}))}
    req = {"template": template, "dtype": str(dtype).replace("torch.", ""), "shape": shape, "op": "trial",
           "config": config, "seed": seed, "timing": dataclasses.asdict(opts)}
    return _handle(req, device, {})


def _shape(name, gpu):
    sets = load_space(name).shape_sets
    return dict((sets["decode" if name == "decode" else "mom-340m-prefill"] if gpu else sets["tiny"]).shapes[0])


def _mutant(name, which):
    t = get_template(name)
    make, kinds = {**GENERIC, **SPECIFIC.get(name, {})}[which]
    return dataclasses.replace(t, name=f"{name}~{which}", launch=make(t.launch)), kinds


@needs_kernels
@pytest.mark.parametrize("name", template_names())
def test_the_unmutated_template_passes_the_gate(name):
    reply = _trial(get_template(name), torch.float32, _shape(name, False), "cpu")
    assert reply["status"] == "ok", reply
    assert reply["bounds"] and all(b[0] > 0 and b[1] > 0 for b in reply["bounds"].values())


@needs_kernels
@pytest.mark.parametrize("name, which", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_every_mutant_is_rejected_with_its_failure_kind(name, which):
    mutant, kinds = _mutant(name, which)
    reply = _trial(mutant, torch.float32, _shape(name, False), "cpu")
    assert reply["status"] == "wrong_answer", f"{which} passed the gate: {reply}"
    assert reply["check"] in kinds, reply["reason"]
    if which in AFTER_TIMING:  # right on the check run: only the re-check after timing sees it
        assert reply["reason"].startswith("after timing"), reply["reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name, which", [*[(n, None) for n in template_names()], *CASES],
                         ids=[*[f"{n}-unmutated" for n in template_names()], *[f"{n}-{m}" for n, m in CASES]])
def test_gpu_bf16_gate_rejects_every_mutant_and_passes_the_template(name, which):
    if which is None:
        reply = _trial(get_template(name), torch.bfloat16, _shape(name, True), "cuda", gpu=True)
        assert reply["status"] == "ok", reply
        return
    mutant, kinds = _mutant(name, which)
    reply = _trial(mutant, torch.bfloat16, _shape(name, True), "cuda", gpu=True)
    assert reply["status"] == "wrong_answer" and reply["check"] in kinds, reply
