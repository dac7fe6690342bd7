"""Where one MoM layer's prefill time goes: a per-kernel profile (torch.profiler), momtune vs fla.

    python3 bench/gpu_profile_layer.py                        # mom-340m, B 8, T 2048, bf16, on CUDA
    python3 bench/gpu_profile_layer.py --impls momtune --preset tiny --B 2 --T 40   # CPU smoke run
    python3 bench/gpu_profile_layer.py --train --impls momtune reference   # a training step instead
    OUT=out python3 bench/gpu_profile_layer.py                # also writes $OUT/profile-layer.json

Why: on the H100 (2026-11-26) the mom-340m layer prefill at B 8, T 2048 took 3.55 ms against a
predicted ~2.3 ms (projection GEMM ~0.8, recurrence ~1.2, conv/merge/routing ~0.3). This prints,
per implementation, the median wall time of one forward (triton.testing.do_bench on CUDA) and,
from one profiled forward after warm-up, every kernel's device time grouped by name (largest
first), their sum, and the gap between the sum and the wall time (host time the GPU waits for:
launch overhead, allocations, synchronisations). ``--train``: the layer's training step (forward
with autograd recording, then every parameter's and x's gradient against a fixed random output
gradient: `momtune bench --what layer_train`'s step), whose time the H200 put at 89 ms (momtune)
against the reference's 220 ms at mom-340m B 8, T 2048 in session 10, before the recurrence
backward's scans were kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _profile(fn, device: str) -> tuple[list[tuple[str, float, int]], float]:
    """(name, total ms, calls) per kernel (CUDA) or op (CPU), largest first, and their sum in ms."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if device == "cuda":
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        else:
            if ev.cpu_parent is not None:  # top-level ops only (no double counting)
                continue
            t = ev.cpu_time_total
        per[ev.name][0] += t / 1e3
        per[ev.name][1] += 1
    rows = sorted(((k, v[0], int(v[1])) for k, v in per.items()), key=lambda r: -r[1])
    return rows, sum(r[1] for r in rows)


def _wall_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    import time

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mom-340m")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--impls", nargs="+", default=["momtune", "fla"])
    ap.add_argument("--top", type=int, default=15, help="kernels shown per implementation")
    ap.add_argument("--train", action="store_true", help="profile a training step (forward + backward)")
    args = ap.parse_args()

    import momtune
    from momtune.bench import layer_kwargs, make_layer
    from momtune.reference.config import MoMConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = MoMConfig.from_preset(args.preset)
    torch.manual_seed(0)
    x = torch.randn(args.B, args.T, cfg.hidden_size, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    report = {"preset": args.preset, "B": args.B, "T": args.T, "device": device, "dtype": str(dtype),
              "what": "train" if args.train else "prefill", "impls": {}}
    for impl in args.impls:
        if device == "cuda":
            layer = make_layer(impl, cfg, dtype, None)
        else:  # CPU smoke run: the momtune layer in the Triton interpreter (fla needs CUDA)
            layer = momtune.MoMAttention(**layer_kwargs(cfg), backend="triton").eval()
        if args.train:
            layer.train()
            if hasattr(layer, "backend"):
                layer.backend = "auto"  # momtune trains on the kernels
            params = [p for p in layer.parameters() if p.requires_grad]
            xg = x.detach().requires_grad_(True)
            fn = lambda: torch.autograd.grad(layer(xg)[0], [*params, xg], dy)  # noqa: E731
            fn()
            wall = _wall_ms(fn, device)
            rows, total = _profile(fn, device)
        else:
            with torch.no_grad():
                fn = lambda: layer(x)  # noqa: E731
                fn()
                wall = _wall_ms(fn, device)
                rows, total = _profile(fn, device)
        print(f"\n{impl} ({report['what']}): {args.preset} B {args.B} T {args.T} {dtype}: wall {wall:.3f} ms, "
              f"{'kernels' if device == 'cuda' else 'ops'} {total:.3f} ms, gap {wall - total:.3f} ms")
        for name, ms, calls in rows[:args.top]:
            print(f"  {ms:9.3f} ms {100 * ms / max(total, 1e-9):5.1f}%  x{calls:<3d} {name[:90]}")
        report["impls"][impl] = {"wall_ms": wall, "kernel_ms": total,
                                 "kernels": [{"name": n, "ms": m, "calls": c} for n, m, c in rows]}
        layer = None
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / f"profile-layer{'-train' if args.train else ''}.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
