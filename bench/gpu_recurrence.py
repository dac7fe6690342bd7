"""GPU benchmark of the chunked recurrence against fla's chunk_gated_delta_rule (H100, bf16).

    python3 bench/gpu_recurrence.py            # mom-340m-prefill + fla-varlen, < 3 min
    python3 bench/gpu_recurrence.py --quick    # fla-varlen only, fewer configs (one STATES="memory")
    python3 bench/gpu_recurrence.py --sweep    # many configs on fla-varlen (tuning aid)

For every shape: checks the default config (and fla) against the float64 reference
(recurrent_chunked on the GPU), times momtune's default and a handful of other configs and fla
with triton.testing.do_bench (median ms, random inputs), and prints shape, impl, ms, floor ms
(max(flops / 685e12, bytes / 3.0e12)) and ms / floor, then each momtune kernel timed alone
(pre-pass, sequential pass, output kernel of STATES="memory"). Writes $OUT/recurrence.json if $OUT
is set.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import tomllib
from pathlib import Path

import torch

PEAK_FLOPS, PEAK_BW = 685e12, 3.0e12  # nominal H100; main() measures this GPU\'s
OTHER_CONFIGS = [  # each was checked correct on the H100 (Triton 3.6) before being listed here
    dict(PRE_QK=True, num_stages=1),
    dict(BV=32),
    dict(num_warps=4),
]
# STATES="memory" (v2: per-chunk states through memory, fla's split); correct in the interpreter and
# within the H100's shared memory when compiled for sm_90 on the CPU, not yet run on the GPU.
# Compiled (bf16, K = V = 256): state pass 144 KiB / 255 regs / 16 B spills, 104 KiB / 242 regs /
# no spills, 120 KiB / 182 regs / no spills; output kernel 40, 16, 28 KiB.
MEMORY_CONFIGS = [
    dict(STATES="memory"),
    dict(STATES="memory", PRE_QK=True, num_stages=1),
    dict(STATES="memory", BV=32),
]
# tuning aid; some Triton 3.6 builds fault on odd configs, which ends the process (run with care)
SWEEP = [
    dict(BT=bt, BV=bv, num_warps=nw, num_stages=ns, PRE_QK=pq)
    for bt in (32, 64) for bv in (32, 64) for nw in (4, 8) for ns in (1, 2) for pq in (False, True)
    if not (pq and ns == 2)
] + [dict(STATES="memory", BT=bt, BV=bv, num_warps=nw, num_stages=ns, PRE_QK=pq, H_FP32=hf)
     for bt in (32, 64) for bv in (32, 64) for nw in (4, 8) for ns in (1, 2) for pq in (False, True)
     for hf in (False, True)]


def load_shapes() -> dict:
    try:
        import momtune.search_spaces as ss

        path = Path(ss.__file__).parent / "recurrence.toml"
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "search_spaces" / "recurrence.toml"
    with open(path, "rb") as f:
        return tomllib.load(f)["shapes"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||out - ref|| / ||ref||, max |out - ref| / max |ref|)."""
    d = out.double() - ref.double()
    return (d.norm() / ref.double().norm()).item(), (d.abs().max() / ref.double().abs().max()).item()


def kernel_times(inp: dict, cfg: dict, do_bench) -> dict[str, float]:
    """Median ms of each launch of one call (pre-pass, sequential pass, output kernel), timed alone
    (each re-run reads what the launch before it wrote once)."""
    from momtune.kernels.recurrence.chunk import kernel_specs, plan, resolve_config

    q, k, v, cu, h0 = (inp[x] for x in ("q", "k", "v", "cu_seqlens", "initial_state"))
    n, h, kd = q.shape
    full = resolve_config(cfg, q.dtype)
    out, fin = torch.empty_like(v), torch.empty_like(h0)
    launches = plan(q, k, v, inp["g"], inp["beta"], cu, out, fin, h0, True, kd ** -0.5, True, full)
    names = kernel_specs(full, n=n, s=cu.numel() - 1, h=h, kd=kd, vd=v.shape[2])
    for fn in launches:
        fn()
    return {name: do_bench(fn, warmup=10, rep=50, return_mode="median") for name, fn in zip(names, launches)}


def main() -> int:
    global PEAK_FLOPS, PEAK_BW
    from momtune.timing import measure_peaks

    peaks = measure_peaks()  # floors from this GPU's own copy bandwidth and bf16 GEMM rate
    PEAK_FLOPS = peaks["flops_per_s"]
    PEAK_BW = peaks["bytes_per_s"]
    print(f"measured peaks: {peaks['bytes_per_s'] / 1e12:.2f} TB/s copy, {peaks['flops_per_s'] / 1e12:.0f} TFLOP/s bf16 GEMM ({peaks['how']})", flush=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fla-varlen only, default + 1 other config")
    ap.add_argument("--sweep", action="store_true", help="time many configs on fla-varlen")
    ap.add_argument("--sets", default=None, help="comma-separated shape sets (default mom-340m-prefill,fla-varlen)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    from momtune.bench import fla_recurrence
    from momtune.kernels import get_template

    tpl = get_template("recurrence")
    shapes = load_shapes()
    sets = args.sets.split(",") if args.sets else (
        ["fla-varlen"] if (args.quick or args.sweep) else ["mom-340m-prefill", "fla-varlen"])
    configs = [{}] + (SWEEP if args.sweep else OTHER_CONFIGS[:1] + MEMORY_CONFIGS[:1] if args.quick
                      else OTHER_CONFIGS + MEMORY_CONFIGS)
    have_fla = importlib.util.find_spec("fla") is not None
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"fla {'yes' if have_fla else 'no'}", flush=True)
    dtype = torch.bfloat16
    rows, t_start = [], time.time()
    hdr = f"{'shape':<26} {'impl':<58} {'ms':>8} {'floor':>7} {'ratio':>6} {'err o':>9} {'err S':>9}"
    for set_name in sets:
        for shape in shapes[set_name]["shapes"]:
            key = "N{N}-S{S}-H{H}-K{K}-V{V}".format(**shape)
            inp = tpl.make_inputs(shape, dtype, "cuda", 0)
            flops, nbytes = tpl.cost(shape, dtype)
            floor = max(flops / PEAK_FLOPS, nbytes / PEAK_BW) * 1e3
            ref = tpl.reference(inp)
            print(f"\n[{set_name}] {key}: floor {floor:.3f} ms (flops {flops:.3g}, bytes {nbytes:.3g})", flush=True)
            print(hdr)
            impls = [("fla chunk_gated_delta_rule", fla_recurrence(inp), None)] if have_fla else []
            impls += [(("momtune " + (",".join(f"{a}={b}" for a, b in c.items()) or "default")),
                       (lambda c=c, inp=inp: tpl.launch(inp, c)), c) for c in configs]
            for name, fn, cfg in impls:
                try:
                    out = fn()
                    torch.cuda.synchronize()
                    eo = rel_err(out["o"], ref["o"])
                    es = rel_err(out["final_state"], ref["final_state"])
                    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                except Exception as e:  # a failed candidate is a recorded outcome
                    print(f"{key:<26} {name:<58} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    rows.append(dict(set=set_name, shape=shape, impl=name, error=f"{type(e).__name__}: {e}"[:500]))
                    continue
                print(f"{key:<26} {name:<58} {ms:8.3f} {floor:7.3f} {ms / floor:6.2f} {eo[0]:9.2e} {es[0]:9.2e}",
                      flush=True)
                row = dict(set=set_name, shape=shape, impl=name, ms=ms, floor_ms=floor, ratio=ms / floor,
                           rel_err_o=eo[0], maxrel_err_o=eo[1], rel_err_state=es[0], maxrel_err_state=es[1])
                if cfg is not None and not args.sweep:  # per-kernel split (the v2 prediction is per kernel)
                    try:
                        row["kernel_ms"] = kernel_times(inp, cfg, do_bench)
                        split = ", ".join(f"{a} {b:.3f}" for a, b in row["kernel_ms"].items())
                    except Exception as e:  # noqa: BLE001
                        split = f"failed: {type(e).__name__}: {str(e)[:100]}"
                    print(f"{'':<26}   per kernel ms: {split}", flush=True)
                rows.append(row)
            del inp, ref
            torch.cuda.empty_cache()
    print(f"\nerr = ||out - ref|| / ||ref|| vs the float64 reference; total {time.time() - t_start:.0f} s")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "recurrence.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    dtype="bfloat16", peak_flops=PEAK_FLOPS, peak_bw=PEAK_BW)
        path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
