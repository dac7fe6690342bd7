"""GPU benchmark of the MoM decode step (one layer, one token per sequence; H100, bf16).

    python3 bench/gpu_decode.py            # default config + a small config sweep, B 1, 8, 32, 128 (< 2 min)
    python3 bench/gpu_decode.py --quick    # default config only
    python3 bench/gpu_decode.py --batches 1,8

Shapes: mom-340m / mom-1.3b decode (H 4, K 256, V 256, E 4, top-2, shared memory; the layer
width D does not enter the step). For every batch size:

- check: the template's launch (default config) against the float64 reference step; prints the
  max abs error of y and of the updated cache (state, conv windows) and whether it is within the
  template's bf16 tolerance;
- eager: ``triton.testing.do_bench`` median of one in-place ``decode_step`` (includes Python
  argument checks and three kernel launches; do_bench flushes L2 before each run);
- graph: 10 steps captured in one CUDA graph, each on its own cache (ten "layers", so the states
  are not L2-resident from the previous step), do_bench median of a replay / 10 = per-step time
  without launch gaps;
- floor = bytes / 3.0e12 (J states read + written in fp32, windows, activations), ratio = graph / floor.

Prints (B, config, eager us, graph us, floor us, ratio) and writes $OUT/decode.json if $OUT is set.
Target: graph time under 20 us at batch 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

PEAK_BW = 3.0e12  # nominal H100; main() measures this GPU\'s
LAYERS = 10  # steps per captured graph, each on its own cache
SWEEP = [
    dict(merge="split", BV=8),
    dict(merge="split", BV=32),
    dict(merge="split", BV=32, num_warps=8),
    dict(merge="split", BV=64, KSPLIT=2, num_warps=8),
    dict(merge="fused", BV=16),
    dict(merge="fused", BV=32),
    dict(merge="fused", BV=32, num_stages=2),
    dict(merge="fused", BV=64, num_warps=8),
    dict(merge="fused", BV=64, KSPLIT=4, num_warps=4),
    dict(merge="fused", BV=256, KSPLIT=8, num_warps=8),
]
ARGS = ("q_t", "k_all", "v_all", "a_all", "b_all", "idx", "weights", "state", "conv_q", "conv_k",
        "conv_v", "q_conv_w", "k_conv_w", "v_conv_w", "A_log", "dt_bias")
CACHE = ("state", "conv_q", "conv_k", "conv_v")


def shape_of(B: int) -> dict:
    return dict(B=B, H=4, K=256, V=256, E=4, topk=2, shared=1)


def step_fn(inp: dict, cache: dict, config: dict, y: torch.Tensor):
    """One in-place decode_step on ``cache`` (the public API)."""
    from momtune.kernels.decode.step import decode_step

    args = [cache[n] if n in cache else inp[n] for n in ARGS]
    kw = dict(rule=inp["rule"], gate=inp["gate"], norm_weight=inp["norm_weight"], eps=inp["eps"],
              config=config, out=y)
    return lambda: decode_step(*args, **kw)


def graph_time_us(inp: dict, config: dict, do_bench) -> float:
    """Per-step time of LAYERS steps (own caches) replayed from one CUDA graph."""
    caches = [{k: inp[k + "_next"].clone() for k in CACHE} for _ in range(LAYERS)]
    ys = [torch.empty(inp["q_t"].shape[0], 4, 256, dtype=inp["q_t"].dtype, device="cuda") for _ in range(LAYERS)]
    fns = [step_fn(inp, c, config, y) for c, y in zip(caches, ys)]
    fns[0]()  # compile outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs recommends
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    ms = do_bench(graph.replay, warmup=10, rep=60, return_mode="median")
    del graph, caches
    return ms * 1e3 / LAYERS


def main() -> int:
    global PEAK_BW
    from momtune.timing import measure_peaks

    peaks = measure_peaks()  # floors from this GPU's own copy bandwidth and bf16 GEMM rate
    PEAK_BW = peaks["bytes_per_s"]
    print(f"measured peaks: {peaks['bytes_per_s'] / 1e12:.2f} TB/s copy, {peaks['flops_per_s'] / 1e12:.0f} TFLOP/s bf16 GEMM ({peaks['how']})", flush=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="default config only")
    ap.add_argument("--batches", default="1,8,32,128", help="comma-separated batch sizes")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    from momtune.kernels import get_template

    tpl = get_template("decode")
    dtype = torch.bfloat16
    configs = [dict(tpl.default_config)] + ([] if args.quick else [{**tpl.default_config, **c} for c in SWEEP])
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    rows, checks, t0 = [], [], time.time()
    for B in (int(b) for b in args.batches.split(",")):
        shape = shape_of(B)
        inp = tpl.make_inputs(shape, dtype, "cuda", B)
        flops, nbytes = tpl.cost(shape, dtype)
        floor_us = nbytes / PEAK_BW * 1e6
        # correctness of the default config against the float64 reference
        out = tpl.launch(inp, tpl.default_config)
        ref = tpl.reference(inp)
        atol, rtol = tpl.tolerance(dtype)
        errs = {k: (out[k].double() - ref[k]).abs().max().item() for k in ref}
        ok = all(bool(((out[k].double() - ref[k]).abs() <= atol + rtol * ref[k].abs()).all()) for k in ref)
        checks.append(dict(B=B, max_abs_err=errs, within_tolerance=ok))
        print(f"\nB={B}: check {'OK' if ok else 'FAILED'}  max abs err "
              + "  ".join(f"{k} {v:.2e}" for k, v in errs.items())
              + f"   floor {floor_us:.2f} us ({nbytes / 1e6:.1f} MB)", flush=True)
        print(f"{'B':>4} {'config':<60} {'eager us':>9} {'graph us':>9} {'floor us':>9} {'ratio':>6}")
        y = torch.empty(B, 4, 256, dtype=dtype, device="cuda")
        for cfg in configs:
            name = ",".join(f"{k}={v}" for k, v in cfg.items() if tpl.default_config.get(k) != v) or "default"
            try:
                fn = step_fn(inp, {k: inp[k + "_next"] for k in CACHE}, cfg, y)
                fn()
                res = tpl.launch(inp, cfg)  # every timed config is also checked
                good = all(bool(((res[k].double() - ref[k]).abs() <= atol + rtol * ref[k].abs()).all()) for k in ref)
                eager = do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3
                graph = graph_time_us(inp, cfg, do_bench)
            except Exception as e:  # a failed config is a recorded outcome
                print(f"{B:>4} {name:<60} failed: {type(e).__name__}: {str(e)[:150]}", flush=True)
                rows.append(dict(B=B, config=cfg, error=f"{type(e).__name__}: {e}"[:500]))
                continue
            flag = "" if good else "  WRONG"
            print(f"{B:>4} {name:<60} {eager:9.2f} {graph:9.2f} {floor_us:9.2f} {graph / floor_us:6.2f}{flag}",
                  flush=True)
            rows.append(dict(B=B, config=cfg, eager_us=eager, graph_us=graph, floor_us=floor_us,
                             ratio=graph / floor_us, correct=good, bytes=nbytes, flops=flops))
        del inp, ref, out
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        if "graph_us" in r and r["correct"] and (r["B"] not in best or r["graph_us"] < best[r["B"]]["graph_us"]):
            best[r["B"]] = r
    print("\nbest per batch (graph us / floor us):")
    for B, r in best.items():
        print(f"  B={B:<4} {r['graph_us']:8.2f} / {r['floor_us']:7.2f}  {r['config']}")
    if 1 in best:
        print(f"target (< 20 us per layer step at B=1): {'met' if best[1]['graph_us'] < 20 else 'NOT met'}")
    print(f"total {time.time() - t0:.0f} s")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "decode.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    dtype="bfloat16", peak_bw=PEAK_BW, graph_steps=LAYERS)
        path.write_text(json.dumps(dict(meta=meta, checks=checks, rows=rows,
                                        best={str(b): r for b, r in best.items()}), indent=1))
        print(f"wrote {path}")
    return 0 if all(c["within_tolerance"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
