"""Compile a kernel for a GPU target on any machine (no GPU needed) and read its resources.

Triton ships ptxas, so a kernel can be compiled for sm_90 (the H100) on the CPU and its shared
memory read from the compiled metadata: a config that would fail with "out of resource" on the
GPU is caught without one. Must run without TRITON_INTERPRET (the interpreter replaces the
kernels); :func:`shared_memory_isolated` runs it in a clean subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

H100_SHARED_LIMIT = 232448  # bytes a block may use on sm_90

_DT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def recurrence_shared_memory(dtype: str, cfg: Mapping[str, Any], K: int = 256, V: int = 256, H: int = 4,
                             capability: int = 90) -> int:
    """Shared memory (bytes) of the recurrence's sequential kernel for ``cfg`` at K, V."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from momtune.kernels.recurrence import chunk

    dt = _DT[dtype]
    ws = "fp32" if cfg["WU_FP32"] else dt
    types = {n: f"*{dt}" for n in ("q", "k", "v", "beta", "o", "qt", "kt")}
    types.update({n: f"*{ws}" for n in ("w", "u", "aqk")})
    types.update({n: "*fp32" for n in ("g", "h0", "ht", "dl", "fq", "fk")})
    types.update(cu="*i32", scale="fp32")
    kp, BV = triton.next_power_of_2(K), min(cfg["BV"], triton.next_power_of_2(V))
    const = dict(H=H, K=K, V=V, KP=kp, BT=cfg["BT"], BV=BV, NV=triton.cdiv(V, BV), IS_DELTA=True,
                 PREPASS=cfg["PREPASS"], PRE_QK=cfg["PREPASS"] and cfg["PRE_QK"], SOLVE=cfg["SOLVE"],
                 L2NORM=True, USE_INIT=True, STORE_FINAL=True)
    fn = chunk._recurrence_kernel
    sig = {p.name: types.get(p.name, "constexpr") for p in fn.params}
    kernel = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", capability, 32),
                            options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return int(kernel.metadata.shared)


def shared_memory_isolated(dtype: str, cfg: Mapping[str, Any], **shape: int) -> int:
    """:func:`recurrence_shared_memory` in a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json,sys; from momtune.resources import recurrence_shared_memory as f; "
            "a=json.loads(sys.argv[1]); print(f(a['dtype'], a['cfg'], **a['shape']))")
    arg = json.dumps(dict(dtype=dtype, cfg=dict(cfg), shape=shape))
    res = subprocess.run([sys.executable, "-c", code, arg], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"compiling for sm_90 failed: {res.stderr.strip().splitlines()[-1:]}")
    return int(res.stdout.strip().splitlines()[-1])
