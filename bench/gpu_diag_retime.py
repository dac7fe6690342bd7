"""Diagnose the interleaved re-timing's faults at the largest short-op shapes (H200, session 10):
every retime of a graph-timed template at B16 T4096 / N65536 timed its configs as inf and the next
request hit an illegal memory access. Each case runs in a fresh process (a fault poisons the CUDA
context) through the worker's own request handler, and prints what raised."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

CASES = {
    "routing-trial": ("routing", dict(B=16, T=4096, E=4, topk=2, shared=1, D=2048), "trial", [{"BLOCK_T": 64, "num_warps": 4}]),
    "routing-retime": ("routing", dict(B=16, T=4096, E=4, topk=2, shared=1, D=2048), "retime",
                       [{"BLOCK_T": 64, "num_warps": 4}, {"BLOCK_T": 128, "num_warps": 4}]),
    "routing-retime-1": ("routing", dict(B=16, T=4096, E=4, topk=2, shared=1, D=2048), "retime",
                         [{"BLOCK_T": 128, "num_warps": 4}]),
    "routing-retime-small": ("routing", dict(B=8, T=2048, E=4, topk=2, shared=1, D=2048), "retime",
                             [{"BLOCK_T": 64, "num_warps": 4}, {"BLOCK_T": 128, "num_warps": 4}]),
    "norm-retime": ("norm", dict(N=65536, D=2048, residual=1), "retime",
                    [{"BLOCK_N": 2, "num_warps": 8}, {"BLOCK_N": 1, "num_warps": 4}]),
    "norm-retime-1": ("norm", dict(N=65536, D=2048, residual=1), "retime", [{"BLOCK_N": 1, "num_warps": 4}]),
}


def one(name: str) -> None:
    import torch

    from momtune import timing, worker

    template, shape, op, configs = CASES[name]
    # every exception the timer raises, with its traceback
    orig = timing.retime_interleaved

    def loud(fns, opts, timer=None, errors=None):
        def t(f):
            try:
                return (timer or (lambda g: timing.measure(g, opts)))(f)
            except Exception:
                traceback.print_exc()
                raise
        return orig(fns, opts, t, errors)

    timing.retime_interleaved = loud
    specs: dict = {}
    base = {"template": template, "shape": shape, "dtype": "bfloat16", "seed": 17,
            "timing": {"interpreter": False}}
    try:
        if op == "trial":
            reply = worker._handle({**base, "op": "trial", "config": configs[0]}, "cuda:0", specs)
        else:
            reply = worker._handle({**base, "op": "retime", "configs": configs}, "cuda:0", specs)
        torch.cuda.synchronize()
        print(name, "reply:", json.dumps({k: v for k, v in reply.items() if k != "bounds"})[:900])
        print(name, "memory: allocated", torch.cuda.memory_allocated() >> 20, "MiB, reserved",
              torch.cuda.memory_reserved() >> 20, "MiB")
    except Exception:
        traceback.print_exc()
        print(name, "raised")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(sys.argv[1])
        sys.exit(0)
    for blocking in ("0", "1"):
        for name in CASES:
            env = dict(os.environ, CUDA_LAUNCH_BLOCKING=blocking)
            print(f"=== {name} CUDA_LAUNCH_BLOCKING={blocking}", flush=True)
            r = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True, text=True, timeout=240)
            print("\n".join((r.stdout + r.stderr).strip().splitlines()[-14:]), flush=True)
