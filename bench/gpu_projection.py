"""The layer prefill's projection, all memories against routed only (issue 12, item 3): is a grouped
GEMM over the packed rows worth building into the fast layer?

Today one GEMM computes x @ [q | g_proj | gate | (k, v, b, a) of every memory slot]^T for every
token, though each token uses top-k + shared slots (mom-340m: 3 of 5, 414 of 2 N D rows' FLOPs
where 276 are used at B 8, T 2048). The routed form: the small GEMM for [q | g_proj | gate], routing
(momtune's route_and_group, on the device), then x gathered in slot-major order and one
``torch._grouped_mm`` with a [D, 2C + 2H] weight per slot (cuBLAS grouped GEMM on sm_90), written
back in the packed layout's segment order (the order the conv and recurrence read). Timed parts:

    full       F.linear(x, W_fused)                          (today's fast layer)
    qg_gate    F.linear(x, W[q | g_proj | gate])
    routing    route_and_group on the logits
    gather     x[token_index of slot-major rows]
    grouped    torch._grouped_mm over the M slot groups
    scatter    rows back to segment order (index_copy)
    routed     all of the above, in one function

Each output row of the routed form is checked against float64 on a sample of packed rows, with the
full GEMM's error on the same rows as its yardstick (both bf16 GEMMs with fp32 accumulation: the
routed error must be within 2x the full one's, plus bf16's half-ulp of the largest entry).

    python3 bench/gpu_projection.py                  # mom-340m at B1 T4096, B8 T2048, B16 T4096
    python3 bench/gpu_projection.py --preset mom-1.3b --shapes 4x2048
    TRITON_INTERPRET=1 python3 bench/gpu_projection.py --device cpu --preset tiny --shapes 2x33 --dtype float32

Prints a table (median ms and min-max of the stable harness, GFLOP, floor from the GPU's measured
bf16 GEMM rate); ``--out`` writes JSON. Prediction (docs/PERFORMANCE.md, session 8): routed saves
at most ~0.2 ms of the 2.3 ms B8 T2048 layer (gather and scatter cost ~0.1 ms of the ~0.2 ms of
GEMM time it saves).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F


def layout(layer: Any) -> tuple[int, int, int, int]:
    """(slot0, slot width, logits offset, logits width) of the fast layer's fused projection rows."""
    if layer.single_kv_proj:
        raise SystemExit("gpu_projection: single_kv_proj layers have one k/v/b/a block for every slot: nothing to route")
    blocks, width, total = layer._layout()
    slot0 = total - layer.num_slots * width
    _, ol, wl = next(b for b in blocks if b[0] == "logits")
    return slot0, width, ol, wl


def routed_projection(layer: Any, x2: torch.Tensor, B: int, T: int) -> tuple[dict[str, torch.Tensor], Any, Any]:
    """(parts, routing, steps): q/g/gate from the small GEMM and k/v/b/a of each packed row in
    segment order, from x gathered per slot and one grouped GEMM; ``steps`` holds each step's
    inputs and output (what main times one by one)."""
    from momtune.kernels.routing.routing import route_and_group

    slot0, width, ol, wl = layout(layer)
    W = layer._fused_weight()
    qg = F.linear(x2, W[:slot0])  # q | g_proj | gate rows
    logits = qg[:, ol:ol + wl].contiguous()
    r = route_and_group(logits.view(B, T, -1), layer.topk, shared=layer.shared_mem)
    M = layer.num_slots
    # slot-major order of the packed rows: a stable sort by memory keeps each segment's rows together
    order = torch.sort(r.row_mem.long(), stable=True).indices
    counts = torch.bincount(r.row_mem.long(), minlength=M)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    src = r.token_index.long().index_select(0, order)
    xs = x2.index_select(0, src)
    w_slots = W[slot0:slot0 + M * width].view(M, width, -1).transpose(1, 2)  # [M, D, width], a view
    y = torch._grouped_mm(xs, w_slots, offs=offs)
    packed = torch.empty_like(y)
    packed.index_copy_(0, order, y)
    steps = SimpleNamespace(head=W[:slot0], logits=logits, order=order, src=src, xs=xs, offs=offs, w_slots=w_slots, y=y)
    return {"qg": qg, "kvba": packed}, r, steps


def full_projection(layer: Any, x2: torch.Tensor) -> torch.Tensor:
    return F.linear(x2, layer._fused_weight())


def check(layer: Any, x2: torch.Tensor, parts: dict[str, torch.Tensor], r: Any, rows: int = 512,
          seed: int = 0) -> dict[str, float]:
    """Relative errors vs float64 on ``rows`` sampled packed rows: the routed kvba (``parts``,
    ``r`` from :func:`routed_projection`) and the full GEMM's slice of the same slot; pass when
    routed <= 2 x full + half an ulp of the dtype."""
    full = full_projection(layer, x2)
    slot0, width, _, _ = layout(layer)
    Np = parts["kvba"].shape[0]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, Np, (min(rows, Np),), generator=g).to(x2.device)
    tok, mem = r.token_index.long()[pick], r.row_mem.long()[pick]
    W = layer._fused_weight().double()
    cols = slot0 + mem[:, None] * width + torch.arange(width, device=x2.device)[None]
    ref = torch.einsum("rd,rcd->rc", x2.double()[tok], W[cols])
    got_routed = parts["kvba"][pick].double()
    got_full = torch.gather(full.double()[tok], 1, cols)
    n = ref.norm()
    e_routed, e_full = float((got_routed - ref).norm() / n), float((got_full - ref).norm() / n)
    half_ulp = float(torch.finfo(x2.dtype).eps) / 2
    return {"err_routed": e_routed, "err_full": e_full, "bound": 2 * e_full + half_ulp,
            "ok": e_routed <= 2 * e_full + half_ulp,
            "qg_equal_full": bool(torch.equal(parts["qg"], full[:, :slot0])) if x2.is_cuda else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mom-340m")
    ap.add_argument("--shapes", nargs="+", default=["1x4096", "8x2048", "16x4096"], help="BxT")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from momtune.bench import cuda_randn, layer_kwargs, make_layer, stable_time
    from momtune.reference.config import MoMConfig

    dev, dt = a.device, getattr(torch, a.dtype)
    if dev == "cuda" and not torch.cuda.is_available():
        print("gpu_projection: needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1 on a tiny shape)", file=sys.stderr)
        return 2
    cfg = MoMConfig.from_preset(a.preset)
    torch.manual_seed(0)
    import momtune

    state = momtune.reference.MoMAttention(**layer_kwargs(cfg)).state_dict()  # as momtune bench's weights
    if dev == "cuda":
        from momtune.timing import measure_peaks

        layer = make_layer("momtune", cfg, dt, state)
        peaks = measure_peaks()
        timer = None
    else:
        layer = momtune.MoMAttention(**layer_kwargs(cfg), backend="triton").to(dt).eval()
        layer.load_state_dict(state, strict=True)
        peaks = {"flops_per_s": None}
        timer = lambda fn: (fn(), 0.0)[1]  # noqa: E731 - the CPU run checks the arithmetic only
    rows_out = []
    print(f"{a.preset} {a.dtype} on {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; bf16 GEMM peak "
          f"{(peaks['flops_per_s'] or 0) / 1e12:.0f} TFLOP/s")
    print(f"{'shape':>10} {'part':>9} {'ms':>8} {'min-max':>15} {'GFLOP':>7} {'floor ms':>8}")
    D = cfg.hidden_size
    for s in a.shapes:
        B, T = (int(v) for v in s.lower().split("x"))
        x2 = cuda_randn((B * T, D), dt, device=dev)
        with torch.no_grad():
            routed, r, st = routed_projection(layer, x2, B, T)
            c = check(layer, x2, routed, r)
            slot0, width, _, _ = layout(layer)
            total = slot0 + layer.num_slots * width
            J = layer.topk + int(layer.shared_mem)
            flops = {"full": 2 * B * T * D * total, "qg_gate": 2 * B * T * D * slot0,
                     "grouped": 2 * B * T * J * D * width}
            flops["routed"] = flops["qg_gate"] + flops["grouped"]
            from momtune.kernels.routing.routing import route_and_group

            out = torch.empty_like(st.y)
            parts = {
                "full": lambda: full_projection(layer, x2),
                "qg_gate": lambda: F.linear(x2, st.head),
                "routing": lambda: route_and_group(st.logits.view(B, T, -1), layer.topk, shared=layer.shared_mem),
                "gather": lambda: x2.index_select(0, st.src),
                "grouped": lambda: torch._grouped_mm(st.xs, st.w_slots, offs=st.offs),
                "scatter": lambda: out.index_copy_(0, st.order, st.y),
                "routed": lambda: routed_projection(layer, x2, B, T),
            }
            for name, fn in parts.items():
                m = stable_time(fn) if timer is None else stable_time(fn, calls=3, timer=timer)
                fl = flops.get(name)
                floor = fl / peaks["flops_per_s"] * 1e3 if fl and peaks["flops_per_s"] else None
                rows_out.append({"shape": {"B": B, "T": T}, "part": name, "ms": m.median_ms, "ms_min": m.min_ms,
                                 "ms_max": m.max_ms, "gflop": fl / 1e9 if fl else None, "floor_ms": floor})
                print(f"{s:>10} {name:>9} {m.median_ms:8.3f} {m.min_ms:7.3f}-{m.max_ms:<7.3f} "
                      f"{(fl or 0) / 1e9:7.1f} {floor if floor is not None else float('nan'):8.3f}")
        print(f"{s:>10} check: routed rel err {c['err_routed']:.2e}, full {c['err_full']:.2e} (bound {c['bound']:.2e}) "
              f"-> {'ok' if c['ok'] else 'FAILED'}")
        rows_out.append({"shape": {"B": B, "T": T}, "check": c})
    if a.out:
        tmp = a.out.with_suffix(a.out.suffix + ".tmp")
        tmp.write_text(json.dumps({"preset": a.preset, "dtype": a.dtype, "peaks": peaks, "rows": rows_out}, indent=1))
        tmp.replace(a.out)
    return 0 if all(r["check"]["ok"] for r in rows_out if "check" in r) else 1


if __name__ == "__main__":
    sys.exit(main())
