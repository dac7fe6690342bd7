"""GPU benchmark of the small fast-path ops: routing, merge (+ fused gated RMSNorm), segment conv.

    python3 bench/gpu_small_ops.py                         # both prefill sets, default configs (< 2 min)
    python3 bench/gpu_small_ops.py --ops merge --sets mom-340m-prefill
    OUT=out python3 bench/gpu_small_ops.py                 # also writes $OUT/small_ops.json

Shapes: the ``mom-340m-prefill`` / ``mom-1.3b-prefill`` sets of search_spaces/{routing,merge,conv}.toml
(B x T = 1x4096, 8x2048, 16x4096; H 4, K = V 256, C 1024, E 4, top-2, shared memory), bfloat16.
Problems identical in both sets (merge, conv) run once. For every problem:

- check: the template's launch (default config, random data) against its float64 reference;
  prints the max abs error over the outputs and whether all are within the bf16 tolerance;
- eager: ``triton.testing.do_bench`` median of one launch (Python checks + kernels);
- graph: 10 launches captured in one CUDA graph (this also proves the op needs no host
  synchronisation), replay median / 10 = the on-device time without launch gaps;
- floor = template cost bytes / 3.0e12 B/s, ratio = graph / floor;
- torch: the PyTorch equivalent, for context (routing: fp32 softmax + topk + argsort grouping;
  merge: index + weighted sum + gated RMSNorm; conv: gather + a shifted-row (unfold-like)
  depthwise conv over the packed rows, masked at segment starts).

Target: routing + merge graph time < 150 us at B 8, T 2048 (10% of a ~1.5 ms MoM layer).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEAK_BW = 3.0e12  # nominal H100; main() measures this GPU\'s
REPS = 10  # launches per captured graph
OPS = ("routing", "merge", "conv")
SETS = ("mom-340m-prefill", "mom-1.3b-prefill")


def shape_sets(op: str) -> dict:
    import tomllib

    return tomllib.loads((ROOT / "search_spaces" / f"{op}.toml").read_text())["shapes"]


def torch_equivalent(op: str, inp: dict):
    """A plain PyTorch version of the op (for context only)."""
    import torch.nn.functional as F

    if op == "routing":
        from momtune.kernels.routing.template import reference_layout

        return lambda: reference_layout(inp["logits"].float(), inp["topk"], inp["shared"])
    if op == "merge":
        from momtune.reference.norm import gated_rms_norm

        o, slot, w, gate, nw = (inp[k] for k in ("o_packed", "slot", "weights", "gate", "norm_weight"))
        B, T, J = slot.shape
        _, H, V = o.shape

        def merge_torch():
            y = (o[slot.long()].float() * w[..., None, None]).sum(2).to(o.dtype)  # [B, T, H, V]
            return gated_rms_norm(y, gate.view(B, T, H, V), nw, 1e-5)

        return merge_torch
    src, weight, tok, mem, seg, cu = (inp[k] for k in ("src", "weight", "token_index", "row_mem", "row_seg", "cu_seqlens"))
    W = weight.shape[1]

    def conv_torch():
        x = src[tok.long(), mem.long()].float()  # [Np, C]
        pos = torch.arange(x.shape[0], device=x.device) - cu.long()[seg.long()]  # position in the segment
        acc = x * weight[:, W - 1].float()
        for d in range(1, W):
            shifted = torch.cat([x.new_zeros(d, x.shape[1]), x[:-d]])
            acc += torch.where((pos >= d)[:, None], shifted, 0.0) * weight[:, W - 1 - d].float()
        return F.silu(acc).to(src.dtype)

    return conv_torch


def graph_ms(fn, do_bench) -> float:
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median") / REPS


def run_problem(op: str, shape: dict, seed: int) -> dict:
    from triton.testing import do_bench

    from momtune.kernels import get_template

    tmpl = get_template(op)
    dtype = torch.bfloat16
    inp = tmpl.make_inputs(shape, dtype, "cuda", seed)
    cfg = dict(tmpl.default_config)
    out = tmpl.launch(inp, cfg)
    ref = tmpl.reference(inp)
    atol, rtol = tmpl.tolerance(dtype)
    errs, ok = {}, True
    for key, r in ref.items():
        o = out[key].double()
        errs[key] = float((o - r).abs().max()) if r.numel() else 0.0
        ok &= bool(((o - r).abs() <= atol + rtol * r.abs()).all())
    del ref, out
    torch.cuda.empty_cache()
    launch = functools.partial(tmpl.launch, inp, cfg)
    eager = do_bench(launch, warmup=10, rep=100, return_mode="median")
    try:
        graph = graph_ms(launch, do_bench)
    except Exception as exc:  # noqa: BLE001 - report, keep going
        print(f"  {op}: CUDA graph capture failed: {exc}", file=sys.stderr)
        graph = float("nan")
    try:
        torch_ms = do_bench(torch_equivalent(op, inp), warmup=5, rep=50, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        torch_ms = float("nan")
    _, nbytes = tmpl.cost(shape, dtype)
    floor = nbytes / PEAK_BW * 1e3
    del inp
    torch.cuda.empty_cache()
    return dict(op=op, shape=shape, config=cfg, max_err=errs, ok=ok, eager_ms=eager, graph_ms=graph,
                floor_ms=floor, ratio=graph / floor, torch_ms=torch_ms, bytes=nbytes)


def main(argv: list[str] | None = None) -> int:
    global PEAK_BW
    from momtune.timing import measure_peaks

    peaks = measure_peaks()  # floors from this GPU's own copy bandwidth and bf16 GEMM rate
    PEAK_BW = peaks["bytes_per_s"]
    print(f"measured peaks: {peaks['bytes_per_s'] / 1e12:.2f} TB/s copy, {peaks['flops_per_s'] / 1e12:.0f} TFLOP/s bf16 GEMM ({peaks['how']})", flush=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help="comma list of routing, merge, conv")
    ap.add_argument("--sets", default=",".join(SETS), help="comma list of shape sets")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"{'op':8} {'shape':44} {'max err':>9} {'ok':>3} {'eager ms':>9} {'graph ms':>9} "
          f"{'floor ms':>9} {'ratio':>6} {'torch ms':>9}")
    t0, rows = time.time(), []
    for op in args.ops.split(","):
        sets = shape_sets(op)
        seen: dict[tuple, dict] = {}
        for sname in args.sets.split(","):
            for shape in sets[sname]["shapes"]:
                key = tuple(sorted(shape.items()))
                if key in seen:
                    seen[key]["sets"].append(sname)
                    continue
                row = run_problem(op, shape, args.seed)
                row["sets"] = [sname]
                seen[key] = row
                rows.append(row)
                desc = " ".join(f"{k}{v}" for k, v in shape.items())
                print(f"{op:8} {desc:44} {max(row['max_err'].values()):9.2e} {'yes' if row['ok'] else 'NO':>3} "
                      f"{row['eager_ms']:9.4f} {row['graph_ms']:9.4f} {row['floor_ms']:9.4f} "
                      f"{row['ratio']:6.2f} {row['torch_ms']:9.4f}", flush=True)
    # the budget: routing + merge at B 8, T 2048
    pick = {r["op"]: r["graph_ms"] for r in rows if r["shape"].get("B") == 8 and r["shape"].get("T") == 2048}
    summary = {}
    if "routing" in pick and "merge" in pick:
        total_us = (pick["routing"] + pick["merge"]) * 1e3
        summary = {"routing_plus_merge_us_B8_T2048": total_us, "target_us": 150.0, "met": total_us < 150.0}
        print(f"routing + merge at B8 T2048 (graph): {total_us:.1f} us (target < 150 us): "
              f"{'met' if total_us < 150 else 'NOT met'}")
    print(f"all checks within tolerance: {all(r['ok'] for r in rows)}   ({time.time() - t0:.0f} s)")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "small_ops.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "triton": triton.__version__, "peak_bw": PEAK_BW, "rows": rows,
                                    "summary": summary}, indent=1))
        print(f"wrote {path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
