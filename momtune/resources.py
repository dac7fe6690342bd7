"""Compile a kernel for a GPU target on any machine (no GPU needed) and read its resources.

Triton ships ptxas, so a kernel can be compiled for sm_90 (the H100) on the CPU and its shared
memory read from the compiled metadata: a config that would fail with "out of resource" on the
GPU is caught without one. Registers and spills are not in the metadata (Triton reads them when
it loads the binary on a GPU); :func:`recurrence_resources` gets them from ``ptxas -v`` on the
compiled PTX. Pointer arguments are compiled as 16-byte aligned, as Triton specialises them for
torch tensors at launch (without that hint loads are not vectorised, nor pipelined through shared
memory, and the shared memory reads far lower than on the GPU). Must run without TRITON_INTERPRET
(the interpreter replaces the kernels); the ``*_isolated`` functions run in a clean subprocess.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

# Shared memory a block may use, by compute capability (CUDA's per-block opt-in maximum, bytes).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
H100_SHARED_LIMIT = SHARED_LIMIT[90]  # sm_90: the H100 and H200

_DT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _arg_types(dtype: str, cfg: Mapping[str, Any]) -> dict[str, str]:
    """Triton signature type of every recurrence kernel argument, by name (as plan() passes them)."""
    dt = _DT[dtype]
    ws = "fp32" if cfg["WU_FP32"] else dt
    hd = "fp32" if cfg["H_FP32"] else dt
    types = {n: f"*{dt}" for n in ("q", "k", "v", "beta", "o", "vw")}
    types.update({n: f"*{ws}" for n in ("w", "u", "aqk", "qt", "kt")})
    types.update({n: "*fp32" for n in ("g", "h0", "ht", "dl", "fq", "fk")})
    types.update(hs=f"*{hd}", cu="*i32", scale="fp32", S="i32")
    return types


def _ptxas_info(ptx: str, capability: int) -> dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` (the flags Triton compiles with); -1 if unknown."""
    info = {"n_regs": -1, "n_spills": -1}
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        arch = sm_arch_from_capability(capability)
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            res = subprocess.run([get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True, timeout=600)
        log = res.stdout + res.stderr
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        if regs:
            info["n_regs"] = int(regs.group(1))
        if spills:
            info["n_spills"] = int(spills.group(1))
    except Exception:  # noqa: BLE001 - resource numbers are advisory; shared memory is the check
        pass
    return info


def _compile(fn: Any, sig: Mapping[str, str], const: Mapping[str, Any], num_warps: int, num_stages: int,
             capability: int, registers: bool) -> dict[str, int]:
    """Compile the Triton kernel ``fn`` (its pointers 16-byte aligned, as torch allocates them) for
    sm_<capability>: {"shared": bytes} and, with ``registers``, "n_regs" and "n_spills"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if sig[p.name].startswith("*")}
    compiled = triton.compile(ASTSource(fn, dict(sig), dict(const), attrs), target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    out = {"shared": int(compiled.metadata.shared)}
    if registers:
        out.update(_ptxas_info(compiled.asm["ptx"], capability))
    return out


def recurrence_resources(dtype: str, cfg: Mapping[str, Any] | None, kernel: str = "recurrence", K: int = 256,
                         V: int = 256, H: int = 4, S: int = 8, capability: int = 90,
                         registers: bool = False) -> dict[str, int]:
    """Compile one recurrence kernel of ``cfg`` (missing keys: the ``dtype`` default) for
    sm_<capability>; returns {"shared": bytes} and, with ``registers``, "n_regs" and "n_spills"
    (spill-store bytes). ``kernel``: "prepass", "recurrence" (the sequential pass) or "output"
    (``STATES="memory"`` only) — see :func:`recurrence_kernel_names`."""
    import torch

    from momtune.kernels.recurrence.chunk import dot_precision, kernel_specs, resolve_config

    cfg = resolve_config(cfg, getattr(torch, dtype))
    specs = kernel_specs(cfg, n=64 * S, s=S, h=H, kd=K, vd=V, dot=dot_precision(getattr(torch, dtype)))
    if kernel not in specs:
        raise KeyError(f"kernel {kernel!r} not launched by {cfg}; launched: {list(specs)}")
    sp = specs[kernel]
    types = _arg_types(dtype, cfg)
    sig = {p.name: types.get(p.name, "constexpr") for p in sp.fn.params}
    return _compile(sp.fn, sig, sp.const, sp.num_warps, sp.num_stages, capability, registers)


def recurrence_kernel_names(cfg: Mapping[str, Any] | None, dtype: str = "bfloat16") -> list[str]:
    """The kernels one call with ``cfg`` launches, in order."""
    import torch

    from momtune.kernels.recurrence.chunk import kernel_specs, resolve_config

    return list(kernel_specs(resolve_config(cfg, getattr(torch, dtype)), n=64, s=1, h=1, kd=16, vd=16))


def recurrence_shared_memory(dtype: str, cfg: Mapping[str, Any], K: int = 256, V: int = 256, H: int = 4,
                             capability: int = 90) -> int:
    """Shared memory (bytes) of the recurrence's sequential kernel for ``cfg`` at K, V."""
    return recurrence_resources(dtype, cfg, "recurrence", K=K, V=V, H=H, capability=capability)["shared"]


def resources_isolated(dtype: str, cfg: Mapping[str, Any], kernels: list[str] | None = None,
                       registers: bool = False, **shape: int) -> dict[str, dict[str, int]]:
    """:func:`recurrence_resources` of ``kernels`` (default: every kernel ``cfg`` launches) in one
    subprocess without TRITON_INTERPRET; {kernel: {"shared": ..., ...}}."""
    code = ("import json,sys; from momtune.resources import recurrence_resources as f, recurrence_kernel_names as n; "
            "a=json.loads(sys.argv[1]); ks=a['kernels'] or n(a['cfg'], a['dtype']); "
            "print(json.dumps({k: f(a['dtype'], a['cfg'], k, registers=a['registers'], **a['shape']) for k in ks}))")
    return _compiled_apart(code, dict(dtype=dtype, cfg=dict(cfg), kernels=kernels, registers=registers, shape=shape),
                           "compiling for sm_90")


def _compiled_apart(code: str, arg: dict[str, Any], what: str) -> Any:
    """Run ``code`` (which prints one JSON line, reading ``arg`` as JSON from argv[1]) in a
    subprocess without TRITON_INTERPRET (the interpreter's kernels cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(arg)], env=env, capture_output=True, text=True,
                         timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def shared_memory_isolated(dtype: str, cfg: Mapping[str, Any], **shape: int) -> int:
    """:func:`recurrence_shared_memory` (the sequential kernel) in a subprocess without TRITON_INTERPRET."""
    return resources_isolated(dtype, cfg, ["recurrence"], **shape)["recurrence"]["shared"]


def scan_resources(kernel: str, K: int = 256, V: int = 256, H: int = 4, L: int = 64, block_v: int = 32,
                   num_warps: int = 4, capability: int = 90, registers: bool = False,
                   vnew: bool = False, delta: bool = True, dfinal: bool = False,
                   initial: bool = False, layout: str = "KV") -> dict[str, int]:
    """Compile one of the recurrence backward's scans (``"forward"`` or ``"backward"``, in the
    state ``layout`` "KV" or "VK",
    :mod:`momtune.kernels.recurrence.scan`; ``vnew``: storing vnew / dvnew too; ``delta`` False:
    the gated-linear rule; ``dfinal`` / ``initial``, the backward scan's: reading the final
    states' gradient / storing the initial states') for sm_<capability>: {"shared": bytes} (and,
    with ``registers``, "n_regs" and "n_spills")."""
    from momtune.kernels.recurrence import scan

    fn = {("forward", "KV"): scan._forward_scan_kernel, ("backward", "KV"): scan._backward_scan_kernel,
          ("forward", "VK"): scan._forward_scan_vk_kernel, ("backward", "VK"): scan._backward_scan_vk_kernel}[
        (kernel, layout)]
    sig = {p.name: ("*i32" if p.name in ("table", "nch") else "i32" if p.name == "MAXC"
                    else "constexpr" if p.name.isupper() else "*fp32") for p in fn.params}
    const = scan.constants(H, K, V, L, block_v, "tf32", vnew, delta)
    if kernel == "backward":
        const.update(scan.state_constants(dfinal, initial))
    return _compile(fn, sig, const, num_warps, 1, capability, registers)


def scan_resources_isolated(kernel: str, **kw: Any) -> dict[str, int]:
    """:func:`scan_resources` in a subprocess without TRITON_INTERPRET."""
    code = ("import json,sys; from momtune.resources import scan_resources as f; "
            "a=json.loads(sys.argv[1]); print(json.dumps(f(a['kernel'], **a['kw'])))")
    return _compiled_apart(code, dict(kernel=kernel, kw=kw), f"compiling the {kernel} scan for sm_90")


def chunk_bwd_resources(kernel: str, dtype: str = "bfloat16", K: int = 256, V: int = 256, H: int = 4, L: int = 64,
                        block_k: int | None = None, block_v: int | None = None, num_warps: int | None = None,
                        solve: str = "blocked",
                        dot: str = "tf32", capability: int = 90, registers: bool = False,
                        num_stages: int | None = None, delta: bool = True) -> dict[str, int]:
    """Compile one of the recurrence backward's chunk kernels (``"terms"`` or ``"grads"``,
    :mod:`momtune.kernels.recurrence.chunk_bwd`) for sm_<capability> with v, do, g, beta (and dv,
    dg, dbeta) in ``dtype``: {"shared": bytes} (and, with ``registers``, "n_regs" and
    "n_spills"). ``block_k``, ``block_v``, ``num_warps``, ``num_stages``: None for the launcher's
    defaults; ``delta`` False: the gated-linear rule."""
    import inspect

    from momtune.kernels.recurrence import chunk_bwd

    fn = {"terms": chunk_bwd._terms_kernel, "grads": chunk_bwd._grads_kernel}[kernel]
    dt = _DT[dtype]
    typed = {**{n: "*i32" for n in ("first", "end")},
             **{n: f"*{dt}" for n in ("v", "do", "g", "beta", "dv", "dg", "db")}}
    sig = {p.name: typed.get(p.name, "constexpr" if p.name.isupper() else "*fp32") for p in fn.params}
    defaults = inspect.signature(chunk_bwd.chunk_backward).parameters
    block_k = defaults["block_k"].default if block_k is None else block_k
    block_v = defaults["block_v"].default if block_v is None else block_v
    const = chunk_bwd.constants(H, K, V, L, block_k, block_v, dot, delta)
    if kernel == "terms":
        const["SOLVE"] = solve
    if num_warps is None:
        num_warps = defaults["terms_warps" if kernel == "terms" else "num_warps"].default
    if num_stages is None:
        num_stages = 1 if kernel == "terms" else defaults["num_stages"].default
    return _compile(fn, sig, const, num_warps, num_stages, capability, registers)


def qk_norm_resources(kernel: str, dtype: str = "bfloat16", K: int = 256, capability: int = 90,
                      registers: bool = False) -> dict[str, int]:
    """Compile one of the L2 normalisation's kernels (``"forward"`` or ``"backward"``,
    :mod:`momtune.kernels.recurrence.qk_norm`) for sm_<capability> with x (and dx) in ``dtype``,
    with the launcher's blocks for ``K``: {"shared": bytes} (and, with ``registers``, "n_regs"
    and "n_spills")."""
    from momtune.kernels.recurrence import qk_norm

    fn = {"forward": qk_norm._l2norm_fwd_kernel, "backward": qk_norm._l2norm_bwd_kernel}[kernel]
    br, bk = qk_norm._blocks(K)
    typed = {"x_ptr": f"*{_DT[dtype]}", "dx_ptr": f"*{_DT[dtype]}", "R": "i32", "K": "i32", "scale": "fp32",
             "eps": "fp32"}
    sig = {p.name: typed.get(p.name, "constexpr" if p.name.isupper() else "*fp32") for p in fn.params}
    return _compile(fn, sig, dict(BLOCK_R=br, BLOCK_K=bk), qk_norm.NUM_WARPS, 1, capability, registers)


def qk_norm_resources_isolated(kernel: str, **kw: Any) -> dict[str, int]:
    """:func:`qk_norm_resources` in a subprocess without TRITON_INTERPRET."""
    code = ("import json,sys; from momtune.resources import qk_norm_resources as f; "
            "a=json.loads(sys.argv[1]); print(json.dumps(f(a['kernel'], **a['kw'])))")
    return _compiled_apart(code, dict(kernel=kernel, kw=kw), f"compiling the L2 normalisation's {kernel} kernel")


def chunk_bwd_resources_isolated(kernel: str, **kw: Any) -> dict[str, int]:
    """:func:`chunk_bwd_resources` in a subprocess without TRITON_INTERPRET."""
    code = ("import json,sys; from momtune.resources import chunk_bwd_resources as f; "
            "a=json.loads(sys.argv[1]); print(json.dumps(f(a['kernel'], **a['kw'])))")
    return _compiled_apart(code, dict(kernel=kernel, kw=kw), f"compiling the chunk backward's {kernel} kernel")
