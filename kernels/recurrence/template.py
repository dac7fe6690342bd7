"""Template of the chunked varlen recurrence (see :mod:`momtune.kernels.recurrence.chunk`).

Shape keys: N (packed tokens), S (segments), H (heads), K (key size), V (value size).
Inputs follow MoM's recurrence call: q, k [N,H,K], v [N,H,V] and beta [N,H] in the dtype,
g [N,H] fp32 log decay in (-5, 0), cu_seqlens int32 [S+1] with uneven lengths (one empty and
one length-1 segment when S >= 3), a random fp32 initial state [S,H,K,V].
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..template import DEFAULT_TOLERANCE, Config, Inputs, Outputs, Shape, Template
from .chunk import DEFAULT_CONFIG, DTYPE_DEFAULTS, chunk_recurrence, resolve_config

COST_BT = 64  # chunk size the FLOP count assumes (the reference chunk of fla and of the default)


def segment_lengths(n: int, s: int, gen: torch.Generator) -> list[int]:
    """Uneven lengths summing to n: weights 0.5 + U(0,1); segment 1 empty and 2 of length 1 if s >= 3."""
    fixed = {1: 0, 2: 1} if s >= 3 and n >= 1 else {}
    free = [i for i in range(s) if i not in fixed]
    rest = n - sum(fixed.values())
    w = 0.5 + torch.rand(len(free), generator=gen, dtype=torch.float64)
    lens = (w / w.sum() * rest).floor().long()
    lens[0] += rest - int(lens.sum())
    out = [0] * s
    for i, length in zip(free, lens.tolist()):
        out[i] = int(length)
    for i, length in fixed.items():
        out[i] = length
    return out


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int) -> Inputs:
    n, s, h, kd, vd = (int(shape[key]) for key in ("N", "S", "H", "K", "V"))
    gen = torch.Generator().manual_seed(seed)
    lens = segment_lengths(n, s, gen)
    cu = torch.zeros(s + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)

    # the bulk draws happen where the tensors live: on a GPU a CPU generator took 1.7 s of each
    # trial at N 49,152 (plus the copy); on the CPU the draws are the same as before
    dev = torch.device(device)
    bulk = gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=bulk, device=dev)

    g = torch.nn.functional.logsigmoid(randn(n, h)).clamp(min=-5.0)
    return {
        "q": randn(n, h, kd).to(device=device, dtype=dtype),
        "k": randn(n, h, kd).to(device=device, dtype=dtype),
        "v": randn(n, h, vd).to(device=device, dtype=dtype),
        "g": g.to(device=device, dtype=torch.float32),
        "beta": torch.sigmoid(randn(n, h)).to(device=device, dtype=dtype),
        "cu_seqlens": cu.to(device),
        "initial_state": randn(s, h, kd, vd).to(device=device, dtype=torch.float32),
        "rule": "gated_delta",
        "scale": None,
    }


def launch(inputs: Inputs, config: Config | None = None, out: Outputs | None = None) -> Outputs:
    out = out or {}
    o, final = chunk_recurrence(
        inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs.get("beta"), inputs["cu_seqlens"],
        rule=inputs.get("rule", "gated_delta"), scale=inputs.get("scale"),
        initial_state=inputs.get("initial_state"), output_final_state=True,
        use_qk_l2norm=inputs.get("use_qk_l2norm", True), config=config,
        out=out.get("o"), final_state=out.get("final_state"),
    )
    return {"o": o, "final_state": final}


def reference(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Outputs:
    """float64 ground truth (chunked form of the exact recurrence, chunk 64)."""
    from momtune.reference.recurrence import recurrent_chunked

    d = dtype
    beta = inputs.get("beta")
    init = inputs.get("initial_state")
    o, final = recurrent_chunked(
        inputs["q"].to(d), inputs["k"].to(d), inputs["v"].to(d), inputs["g"].to(d),
        None if beta is None else beta.to(d), cu_seqlens=inputs["cu_seqlens"],
        rule=inputs.get("rule", "gated_delta"), scale=inputs.get("scale"),
        initial_state=None if init is None else init.to(d),
        use_qk_l2norm=inputs.get("use_qk_l2norm", True), chunk_size=64,
    )
    return {"o": o, "final_state": final}


def flops_per_token(k: int, v: int, rule: str = "gated_delta", bt: int = COST_BT) -> int:
    """Matmul FLOPs per token and head of the chunked algorithm (chunk bt).

    gated_delta, per chunk of bt rows: k k^T, q k^T, W = T k (2 bt^2 K each), U = T v,
    (q k^T) vnew (2 bt^2 V each), W S, q S, k^T vnew (2 bt K V each)
    -> per token 2 bt (3K + 2V) + 6 K V.   gated_linear: q k^T, (q k^T) v, q S, k^T v
    -> per token 2 bt (K + V) + 4 K V.
    """
    if rule == "gated_delta":
        return 2 * bt * (3 * k + 2 * v) + 6 * k * v
    return 2 * bt * (k + v) + 4 * k * v


def cost(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    """(flops, bytes): bytes read q, k, v, g (fp32), beta, initial state (fp32) and write o,
    final state (fp32) once each."""
    n, s, h, kd, vd = (int(shape[key]) for key in ("N", "S", "H", "K", "V"))
    e = torch.empty((), dtype=dtype).element_size()
    flops = float(n * h * flops_per_token(kd, vd))
    nbytes = n * h * ((2 * kd + 2 * vd + 1) * e + 4) + 2 * s * h * kd * vd * 4
    return flops, float(nbytes)


def check_config(shape: Shape, config: Config) -> str:
    """Why ``config`` cannot run ``shape`` ('' if it can); mirrors the TOML constraints."""
    cfg = resolve_config(config)
    kd = int(shape["K"])
    kp = max(16, 1 << (kd - 1).bit_length())
    bv = min(cfg["BV"], max(16, 1 << (int(shape["V"]) - 1).bit_length()))
    if cfg["STATES"] == "memory" and not cfg["PREPASS"]:
        return "STATES='memory' needs PREPASS (it reads W, U and the masked q.k from the pre-pass)"
    if cfg["STATE_LAYOUT"] == "VK" and not cfg["PREPASS"]:
        return "STATE_LAYOUT='VK' needs PREPASS (it reads W, U and the masked q.k from the pre-pass)"
    if not cfg["PREPASS"] and cfg["BT"] * kp > 8192:
        return f"fused pass: BT*K = {cfg['BT'] * kp} > 8192 (shared memory / faults on the H100)"
    if cfg["PREPASS"] and cfg["PRE_QK"] and cfg["num_stages"] > 1 and kp > 128 and cfg["STATES"] == "register":
        return "PRE_QK with num_stages > 1 at K > 128 exceeds the H100's shared memory"
    if kp * bv > 16384:
        return f"state block [K, BV] = {kp}x{bv} fp32 does not fit the register file"
    if cfg["STATES"] == "memory":
        wu, pq = int(cfg["WU_FP32"]), int(cfg["PRE_QK"])
        staged = cfg["num_stages"] * cfg["BT"] * (kd * (4 + 2 * wu + 2 * wu * pq) + kd // 2 * pq + bv * (2 + 2 * wu))
        if staged >= 229376:
            return (f"STATES='memory': the state pass stages ~{staged} B of W/k/U tiles "
                    "(>= 224 KiB: over the H100's shared memory)")
    return ""


_HERE = Path(__file__).resolve().parent

TEMPLATE = Template(
    name="recurrence",
    shape_keys=("N", "S", "H", "K", "V"),
    make_inputs=make_inputs,
    launch=launch,
    reference=reference,
    default_config=dict(DEFAULT_CONFIG),
    cost=cost,
    sources=tuple(str(_HERE / f) for f in ("chunk.py", "common.py", "output.py", "template.py")),
    tolerances={**DEFAULT_TOLERANCE, torch.float32: (2e-3, 2e-3), torch.bfloat16: (5e-2, 5e-2)},
    check_config=check_config,
    dtype_defaults=DTYPE_DEFAULTS,
    # 36 KiB (bf16) / 68 KiB (fp32, IEEE dots; 40 with TF32) of shared memory at K = V = 256 for
    # sm_80 and sm_89 (99 KiB a block), compiled on the CPU (momtune.resources); the bf16 default
    # takes 144 KiB there
    fallbacks=({"BT": 32, "BV": 32, "num_stages": 1},),
    tf32=True,
)
