"""The backward templates against PyTorch's autograd of the same ops (issue 14), bf16, on a GPU.

For mom-340m and mom-1.3b at B x T = 8 x 2048 (N 16384 rows): the backward of the LM's mlp_norm
(RMSNorm with the residual add) and of its SwiGLU activation, three ways, side by side:

    kernel      norm_bwd / swiglu_bwd at their default configs (what the LM's training step runs)
    autograd    torch.autograd.grad through the reference ops (what `backend="reference"` runs)
    floor       bytes moved once / the GPU's measured copy bandwidth

Each timed with momtune's stable harness (warm until two medians agree within 3%, >= 30 calls,
median and min-max), outputs checked by the tuner's gate against float64 before timing.

    python3 bench/gpu_backward.py [--presets mom-340m mom-1.3b] [--rows 16384] [--out FILE]
    TRITON_INTERPRET=1 python3 bench/gpu_backward.py --device cpu --rows 5   # the plumbing, float32

Prediction (docs/PERFORMANCE.md, session 8): norm_bwd 0.04-0.05 ms and swiglu_bwd 0.09-0.10 ms at
mom-340m, 3-5x autograd.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["mom-340m", "mom-1.3b"])
    ap.add_argument("--rows", type=int, default=16384, help="N = B x T (default 8 x 2048)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: Triton's interpreter in float32 (checks the plumbing; its times mean nothing)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_backward: needs a CUDA GPU; the CPU checks are tests/kernels/test_backward_templates.py",
              file=sys.stderr)
        return 2
    import torch.nn.functional as F

    from momtune.bench import stable_time
    from momtune.gate import bounds_for, check
    from momtune.kernels import get_template
    from momtune.reference.norm import rms_norm
    from momtune.space import load_space
    from momtune.timing import measure_peaks

    dev = a.device
    if dev == "cuda":
        peaks, dt, timed = measure_peaks(), torch.bfloat16, stable_time
    else:  # the interpreter: float32 (its bf16 dots are wrong), nominal bandwidth, three untimed calls
        peaks, dt = {"bytes_per_s": 3.0e12, "measured": False}, torch.float32
        timed = lambda fn: stable_time(fn, calls=3, timer=lambda f: (f(), 0.0)[1])  # noqa: E731
    bw = peaks["bytes_per_s"]
    rows, failed = [], []
    print(f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (interpreter)'}: copy {bw / 1e12:.2f} TB/s; "
          f"{str(dt).replace('torch.', '')}, N {a.rows}")
    print(f"{'preset':>9} {'op':>10} {'impl':>9} {'ms':>8} {'min-max':>15} {'floor':>7} {'x floor':>7}")
    for preset in a.presets:
        for name in ("norm_bwd", "swiglu_bwd"):
            # the shape the tuner searches for this preset (D, I from the search space's prefill set), at N rows
            sets = load_space(name).shape_sets
            if f"{preset}-prefill" not in sets:
                print(f"gpu_backward: {name} has no {preset}-prefill shape set; sets: {', '.join(sets)}", file=sys.stderr)
                return 2
            shape = {**sets[f"{preset}-prefill"].shapes[0], "N": a.rows}
            t = get_template(name)
            inputs = t.make_inputs(shape, dt, dev, 0)
            got = t.launch(inputs, t.default_config)
            ref = t.reference(inputs)
            verdict = check(got, ref, bounds_for(t, inputs, ref, got, dt, dev))
            if not verdict.ok:
                failed.append(f"{preset} {name}: {verdict.reason}")
            if name == "norm_bwd":
                h = inputs["h"].detach().requires_grad_(True)
                w = inputs["weight"].detach().requires_grad_(True)

                def autograd() -> None:
                    y = rms_norm(h, w, 1e-6)
                    torch.autograd.grad((y, h), (h, w), (inputs["dy"], inputs["dh_out"]))
            else:
                g = inputs["g"].detach().requires_grad_(True)
                u = inputs["u"].detach().requires_grad_(True)

                def autograd() -> None:
                    torch.autograd.grad(F.silu(g) * u, (g, u), inputs["dy"])
            floor = t.cost(shape, dt)[1] / bw * 1e3
            for impl, fn in (("kernel", lambda: t.launch(inputs, t.default_config)), ("autograd", autograd)):
                m = timed(fn)
                rows.append({"preset": preset, "op": name, "shape": shape, "impl": impl, "ms": m.median_ms,
                             "ms_min": m.min_ms, "ms_max": m.max_ms, "floor_ms": floor,
                             "rel_err": verdict.worst[0] if impl == "kernel" else None})
                print(f"{preset:>9} {name:>10} {impl:>9} {m.median_ms:8.4f} {m.min_ms:7.4f}-{m.max_ms:<7.4f} "
                      f"{floor:7.4f} {m.median_ms / floor:7.2f}")
    for f in failed:
        print(f"FAILED the gate: {f}")
    if a.out:
        tmp = a.out.with_suffix(a.out.suffix + ".tmp")
        tmp.write_text(json.dumps({"peaks": peaks, "rows": rows, "failed": failed}, indent=1))
        tmp.replace(a.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
