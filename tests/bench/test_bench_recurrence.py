"""`momtune bench --what recurrence` (issue 12): the chunked recurrence alone, momtune vs fla vs
FlashInfer's SM90 prefill, with floors from the GPU's measured peaks and errors against float64."""
from __future__ import annotations

import pytest
import torch

from momtune import bench


def test_recurrence_is_a_bench_kind_with_its_shape_sets() -> None:
    from momtune.errors import InputError
    from momtune.report.collect import BENCH_KINDS

    assert "recurrence" in bench.KINDS and "recurrence" in BENCH_KINDS and "flashinfer" in bench.IMPLS
    assert bench.recurrence_shapes("fla-varlen") == [dict(N=32768, S=8, H=4, K=256, V=256)]
    assert [s["N"] for s in bench.recurrence_shapes("mom-340m-prefill")] == [12288, 49152, 196608]
    with pytest.raises(InputError, match="shape set 'nope'.*N<tokens>-S<segments>"):
        bench.recurrence_shapes("nope")
    # one shape as a study names it (FlashInfer's prefill runs head size 128 only: MoM's 256 it refuses)
    assert bench.recurrence_shapes("N32768-S8-H16-K128-V128") == [dict(N=32768, S=8, H=16, K=128, V=128)]
    for bad in ("N32768-S8-H16-K128", "N8-S9-H1-K16-V16", "N8-S1-H0-K16-V16", "N8-S1-H1-K16-V16x"):
        with pytest.raises(InputError, match="recurrence shape"):
            bench.recurrence_shapes(bad)
    with pytest.raises(InputError, match="flashinfer.*no MoM layer"):
        bench.make_layer("flashinfer", None, torch.float32, None)


def test_flashinfer_adapter_meets_its_contract() -> None:
    """The adapter's conversions, against a stand-in for FlashInfer's kernel written from its
    documented contract (flashinfer.gdn_prefill.chunk_gated_delta_rule: q and k as given, no L2
    norm in the SM90 path; g the decay factor alpha, float32; beta float32; int64 cu_seqlens;
    states [S, H, V, K] float32): the adapter's answer is the recurrence template's reference."""
    from momtune.kernels import get_template
    from momtune.reference.recurrence import recurrent_chunked

    seen = {}

    def contract(q, k, v, g=None, beta=None, scale=None, initial_state=None, output_final_state=False,
                 cu_seqlens=None):
        seen.update(cu=cu_seqlens.dtype, g=g.dtype, beta=beta.dtype, h0=tuple(initial_state.shape))
        assert torch.allclose(q.float().norm(dim=-1), torch.ones(()), atol=1e-4)  # normalised by the caller
        assert torch.allclose(k.float().norm(dim=-1), torch.ones(()), atol=1e-4)
        assert bool(((g > 0) & (g <= 1)).all())  # a factor, not a log
        o, ht = recurrent_chunked(q, k, v, g.log(), beta, cu_seqlens=cu_seqlens, scale=scale,
                                  initial_state=initial_state.transpose(-1, -2), use_qk_l2norm=False)
        assert output_final_state
        return o, ht.transpose(-1, -2).contiguous()

    tpl = get_template("recurrence")
    shape = dict(N=70, S=3, H=2, K=16, V=8)  # K != V: the state layout must be right
    inp = tpl.make_inputs(shape, torch.float32, "cpu", 3)
    got = bench.flashinfer_recurrence(inp, chunk_fn=contract)()
    ref = tpl.reference(inp)
    assert seen == dict(cu=torch.int64, g=torch.float32, beta=torch.float32, h0=(3, 2, 8, 16))
    assert bench._rel(got["o"], ref["o"]) < 1e-5
    assert bench._rel(got["final_state_vk"].transpose(-1, -2), ref["final_state"]) < 1e-5



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_recurrence_rows_time_check_and_floor_each_impl() -> None:
    """momtune and fla on one ragged bf16 shape: both rows timed (eager, and a graph where
    captured), over a positive floor, and within 4 x the error of the reference computed in float32
    and rounded to bf16 (the correctness gate's bound) from the float64 reference."""
    from momtune.kernels import get_template
    from momtune.timing import measure_peaks

    shape = dict(N=3000, S=3, H=4, K=256, V=256)
    tpl = get_template("recurrence")
    inp = tpl.make_inputs(shape, torch.bfloat16, "cuda", 0)  # bench_recurrence's inputs (seed 0)
    ref, ref32 = tpl.reference(inp), tpl.reference(inp, torch.float32)
    own = {key: bench._rel(ref32[key].to(torch.bfloat16), ref[key]) for key in ("o", "final_state")}
    rows = bench.bench_recurrence("test", shape, ["momtune", "fla"], torch.bfloat16, measure_peaks())
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"momtune", "fla"} and not any("failed" in str(r.get("note", "")) for r in rows), rows
    for r in rows:
        assert r["ms"] > 0 and r["floor_ms"] > 0 and r["x_floor"] == pytest.approx(r["ms"] / r["floor_ms"])
        assert r["rel_err_o"] <= 4 * own["o"] and r["rel_err_state"] <= 4 * own["final_state"], (r, own)
    assert by["momtune"]["config_source"] and "BT" in by["momtune"]["config"]
