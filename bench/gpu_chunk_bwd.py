"""The recurrence backward's chunk-local work, PyTorch against the Triton kernels (issue 14), on a GPU.

mom-340m at B x T = 8 x 2048: N 49,152 routed rows (E 4, top-2, plus the shared memory), S 40
segments (per batch row four memories of random sizes summing to 4096 and the shared one of
2048), H 4, K = V = 256, chunks of 64, bf16 inputs (q, k, v, g, beta, do), TF32 dots. Rows:

    old total       gated_delta_backward with TritonScans (PyTorch chunk work + Triton scans):
                    what _Recurrence.backward ran before this change
    old chunk work  the same with the scans' results cached (gathers, _chunk_terms, _chunk_grads
                    in groups, index_add_): the PyTorch chunk-local work alone
    new total       gated_delta_backward with TritonBackward (what _Recurrence.backward runs now;
                    includes the L2 norm's autograd and the chunk bookkeeping, as "old total")
    new <kernel>    chunk_backward's four launches timed in place with CUDA events: terms,
                    forward_scan, backward_scan, grads

Each row: median and min-max over >= 30 calls after warm-up (momtune.bench.stable_time: rounds
until two medians agree within 3%; per-kernel rows: 40 calls after 5 warm-up calls), and for the
new kernels the predicted time max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s) (DRAM bytes counted once
per chunk and head; the dots are TF32, whose dense peak is about half of 790: the FLOP column says
how many). The new path's gradients are checked against the old path's (relative error printed).

    python3 bench/gpu_chunk_bwd.py [--batch 8] [--seq 2048] [--sweep] [--out FILE]

``--sweep``: also each kernel under a few other launch parameters (SWEEP: the gradient kernel's
pipelining and blocks, the scans' V blocks and warps; every one compiles for sm_90 within shared
memory), each checked against the defaults' gradients, 20 calls after 5 warm-up calls.
    TRITON_INTERPRET=1 python3 bench/gpu_chunk_bwd.py --device cpu   # the plumbing, tiny, float32

Predicted at B8 T2048 (C = 782 chunks x 4 heads): terms 0.42 ms, forward scan 0.38 ms, backward
scan 0.44 ms, grads 0.78 ms, each memory-bound (8.7 GB in all; 350 GFLOP, 0.9 ms at TF32's dense
peak): 2.0 ms at the bandwidth floor, 2.5-4 ms expected (TF32 dots at M = 64, one program of 8
warps per SM in grads, the scans' sequential chunk steps).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

BW, FLOPS = 4.3e12, 790e12  # H200: HBM3e bandwidth, dense bf16 tensor-core rate
SWEEP = [  # chunk_backward launch parameters besides its defaults (compiled for sm_90: spills noted)
    dict(block_k=32),  # the default before session 12: no spills (grads 3.74 ms against 2.76 at 64, H200)
    dict(num_stages=2),  # the default before session 12's last call: grads 2.74 against 2.19 ms (H200)
    dict(num_stages=1),
    dict(block_v=16),
    dict(terms_warps=8),
    dict(scan_layout="VK"),  # both scans with the state transposed (session 13, CPU: 0 spills, Triton 3.6)
    dict(scan_layout="VK", fwd_block_v=32, bwd_block_v=32),
]


def segments(batch: int, seq: int, experts: int = 4, topk: int = 2, seed: int = 0) -> list[int]:
    """cu_seqlens of a MoM layer's routed rows: per batch row ``experts`` segments of random sizes
    summing to seq * topk, then the shared memory's segment of ``seq``."""
    gen = torch.Generator().manual_seed(seed)
    cu = [0]
    for _ in range(batch):
        w = 0.5 + torch.rand(experts, generator=gen)
        n = (w / w.sum() * seq * topk).floor().long()
        n[-1] += seq * topk - int(n.sum())
        for x in [*n.tolist(), seq]:
            cu.append(cu[-1] + int(x))
    return cu


def predicted(cu: list[int], H: int, K: int, V: int, L: int, elt: int) -> dict[str, tuple]:
    """Per kernel: (DRAM bytes, FLOPs, ms = max(bytes / BW, FLOPs / FLOPS)) at these segments."""
    C = sum(-(-(b - a) // L) for a, b in zip(cu, cu[1:]))
    f4, LL = 4, L * L
    levels = max(L.bit_length() - 2, 0)
    per = {
        "terms": ((2 * L * K * f4 + 2 * L * V * elt + 3 * L * K * f4 + 2 * L * V * f4 + 3 * LL * f4),
                  4 * LL * K + levels * 4 * L * LL + 2 * LL * K + 2 * LL * V),
        "forward_scan": ((2 * L * K + L * V) * f4 + K * V * f4 + L * V * f4, 4 * L * K * V),
        "backward_scan": ((3 * L * K + LL + L * V) * f4 + K * V * f4 + L * V * f4, 6 * L * K * V + 2 * LL * V),
        # S0, dS; vnew, dvnew; T, P, KKD; q, k; v, do; dRU written (and read back from L2); dq, dk; dv
        "grads": (2 * K * V * f4 + 2 * L * V * f4 + 3 * LL * f4 + 2 * L * K * f4 + 2 * L * V * elt
                  + L * V * f4 + 2 * L * K * f4 + L * V * elt,
                  6 * LL * V + 6 * L * K * V + 6 * LL * K),
    }
    out = {}
    for name, (nbytes, flops) in per.items():
        nb, fl = nbytes * C * H, flops * C * H
        out[name] = (nb, fl, max(nb / BW, fl / FLOPS) * 1e3)
    return out


def per_kernel(run, calls: int, warmup: int = 5) -> dict[str, list[float]]:  # noqa: ANN001
    """``run(events)`` ``warmup + calls`` times; each kernel's times (ms) over the last ``calls``."""
    events: dict[str, list] = {}
    for i in range(warmup + calls):
        if i == warmup:
            torch.cuda.synchronize()
            events.clear()
        run(events)
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}


class CachedScans:
    """``scans`` that return precomputed S0 and dS: gated_delta_backward's PyTorch chunk work alone."""

    def __init__(self, s0: torch.Tensor, ds: torch.Tensor) -> None:
        self.s0, self.ds = s0, ds

    def forward(self, *_):  # noqa: ANN002, ANN201
        return self.s0

    def backward(self, *_):  # noqa: ANN002, ANN201
        return self.ds


class Recording:
    """TritonScans that keeps the states it computed (for CachedScans)."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner, self.s0, self.ds = inner, None, None

    def forward(self, *a):  # noqa: ANN002, ANN201
        self.s0 = self.inner.forward(*a)
        return self.s0

    def backward(self, *a):  # noqa: ANN002, ANN201
        self.ds = self.inner.backward(*a)
        return self.ds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: Triton's interpreter, float32, a tiny shape (checks the plumbing; no times)")
    ap.add_argument("--sweep", action="store_true", help="also time the kernels under the SWEEP launch parameters")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_chunk_bwd: needs a CUDA GPU; the CPU checks are tests/kernels/test_recurrence_chunk_bwd.py",
              file=sys.stderr)
        return 2
    from momtune.bench import stable_time
    from momtune.kernels.recurrence import chunk_bwd
    from momtune.kernels.recurrence.scan import TritonScans
    from momtune.reference.recurrence import gated_delta_backward

    dev = a.device
    if dev == "cuda":
        dt, dot, timed = torch.bfloat16, "tf32", stable_time
        batch, seq, H, K = a.batch, a.seq, a.heads, a.head_dim
    else:  # the interpreter: float32 (its bf16 dots are wrong), tiny, three untimed calls
        dt, dot = torch.float32, "ieee"
        timed = lambda fn: stable_time(fn, calls=3, timer=lambda f: (f(), 0.0)[1])  # noqa: E731
        batch, seq, H, K = 1, 40, 2, 16
    V, L = K, 64 if dev == "cuda" else 16
    cu = segments(batch, seq)
    N = cu[-1]
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(N, H, K, generator=gen).to(dev, dt) for _ in range(2))
    v, do = (torch.randn(N, H, V, generator=gen).to(dev, dt) for _ in range(2))
    g = (-0.1 * torch.rand(N, H, generator=gen)).to(dev, dt)
    b = torch.rand(N, H, generator=gen).to(dev, dt)
    cu_t = torch.tensor(cu, device=dev)
    args = (q, k, v, g, b, do)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the old path's PyTorch matmuls at the kernels' TF32
    try:
        rec = Recording(TritonScans(dot=dot))
        want = gated_delta_backward(*args, cu_seqlens=cu_t, chunk_size=L, scans=rec)
        cached = CachedScans(rec.s0, rec.ds)
        new = chunk_bwd.TritonBackward(dot=dot)
        got = gated_delta_backward(*args, cu_seqlens=cu_t, chunk_size=L, scans=new)
        errs = {n: float((x.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30))
                for n, x, w in zip(("dq", "dk", "dv", "dg", "dbeta"), got, want)}
        fns = {
            "old total": lambda: gated_delta_backward(*args, cu_seqlens=cu_t, chunk_size=L, scans=TritonScans(dot=dot)),
            "old chunk work": lambda: gated_delta_backward(*args, cu_seqlens=cu_t, chunk_size=L, scans=cached),
            "new total": lambda: gated_delta_backward(*args, cu_seqlens=cu_t, chunk_size=L, scans=new),
        }
        rows = []
        name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)"
        C = sum(-(-(y - x) // L) for x, y in zip(cu, cu[1:]))
        print(f"{name}: N {N}, S {len(cu) - 1}, C {C} chunks of {L}, H {H}, K = V = {K}, "
              f"{str(dt).replace('torch.', '')}, dots {dot}")
        print("new vs old gradients (relative error): " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
        print(f"{'impl':>20} {'ms':>8} {'min-max':>17} {'pred ms':>8} {'GB':>6} {'GFLOP':>7}")
        for impl, fn in fns.items():
            m = timed(fn)
            rows.append(dict(impl=impl, ms=m.median_ms, ms_min=m.min_ms, ms_max=m.max_ms, calls=m.calls))
            print(f"{impl:>20} {m.median_ms:8.3f} {m.min_ms:8.3f}-{m.max_ms:<8.3f}")
        if dev == "cuda":
            pred = predicted(cu, H, K, V, L, torch.finfo(dt).bits // 8)
            qf, kf = (torch.nn.functional.normalize(x.float(), dim=-1, eps=0.0) for x in (q, k))
            qf = qf * K ** -0.5
            base = chunk_bwd.chunk_backward(qf, kf, v, g, b, do, cu, chunk_size=L, dot=dot)
            total_pred = 0.0
            for kname, ts in per_kernel(lambda ev: chunk_bwd.chunk_backward(
                    qf, kf, v, g, b, do, cu, chunk_size=L, dot=dot, events=ev), 40).items():
                nb, fl, pms = pred[kname]
                total_pred += pms
                rows.append(dict(impl=f"new {kname}", ms=statistics.median(ts), ms_min=min(ts), ms_max=max(ts),
                                 calls=len(ts), predicted_ms=pms, bytes=nb, flops=fl))
                print(f"{'new ' + kname:>20} {statistics.median(ts):8.3f} {min(ts):8.3f}-{max(ts):<8.3f} "
                      f"{pms:8.3f} {nb / 1e9:6.2f} {fl / 1e9:7.1f}")
            kernels_ms = sum(r["ms"] for r in rows if r["impl"].startswith("new ") and r["impl"] != "new total")
            print(f"{'new kernels, sum':>20} {kernels_ms:8.3f} {'':>17} {total_pred:8.3f}   (new total - this: the "
                  f"L2 norm's autograd, casts, bookkeeping)")
            for launch in SWEEP if a.sweep else []:
                try:
                    out = chunk_bwd.chunk_backward(qf, kf, v, g, b, do, cu, chunk_size=L, dot=dot, **launch)
                    err = max(float((x.double() - y.double()).norm() / y.double().norm()) for x, y in zip(out, base))
                    ts = per_kernel(lambda ev: chunk_bwd.chunk_backward(
                        qf, kf, v, g, b, do, cu, chunk_size=L, dot=dot, events=ev, **launch), 20)
                except Exception as exc:  # noqa: BLE001 - a sweep row that fails is reported, not fatal
                    print(f"  sweep {launch}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                meds = {kn: statistics.median(t) for kn, t in ts.items()}
                rows.append(dict(impl="sweep", launch=launch, ms=meds, err_vs_default=err))
                print(f"  sweep {json.dumps(launch)}: " + ", ".join(f"{kn} {ms:.3f}" for kn, ms in meds.items())
                      + f" ms (sum {sum(meds.values()):.3f}); max rel diff vs defaults {err:.1e}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    if a.out:
        a.out.write_text(json.dumps(dict(cu=cu, H=H, K=K, errors=errs, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
