"""GPU smoke check: every kernel, the fast layer and the fast LM against their references, once.

    python3 bench/gpu_smoke.py                       # on a CUDA GPU: real shapes, bf16 (~2-3 min cold)
    python3 bench/gpu_smoke.py --out smoke.json      # the JSON (rows, log, provenance); default
                                                     # $OUT/gpu-smoke.json when $OUT is set
    python3 bench/gpu_smoke.py --only template:recurrence,layer   # a subset (names below)
    TRITON_INTERPRET=1 python3 bench/gpu_smoke.py --tiny          # CPU development run (< 1 min)

Checks (one row each; an exception is a FAIL row with the exception's last line):

- ``template:<name>`` for every registered template: its first shape of the ``mom-340m-prefill``
  set (``decode`` for the decode template), bf16, the template's dtype default config, outputs
  preallocated and poisoned (momtune.validate.poison_like) and passed as ``out=``, compared with
  the template's float64 reference by momtune.gate (the search's gate): per output, norm-wise and
  element-wise bounds of FACTOR x the reference's own error in the dtype (the tightest output's
  shown), plus: every floating output finite, ``out=`` honoured.
- ``layer:prefill+decode``: momtune.MoMAttention (Triton) at the mom-340m layer shape, prefill
  B 2, T 257 (a ragged last chunk), then 3 decode steps through the cache, bf16, against
  momtune.reference.MoMAttention in float64 on the same (bf16-rounded) weights, by
  momtune.layer_check: top-k routing is discrete and bf16 router logits flip near-tied tokens to
  other memories (an O(1) change that no bound on rounding covers), so the float64 reference is
  routed on the fast layer's own router logits, and the bound is FACTOR (2) x the error of the
  reference itself run in bf16 (routed the same way); the router logits must be within FACTOR x
  the bf16 reference's. The decode steps run the three layers in lockstep through their caches.
- ``lm:fp32-logits`` / ``lm:fp32-generate``: momtune.MoMForCausalLM (mom-340m, 4 layers) and
  the reference LM in float32, same weights: prefill logits and the decode-step logits along the
  reference's tokens (norm-wise 5e-3: Triton runs fp32 tl.dot in tf32); greedy generate of 16
  tokens from B 2, T 33 (momtune: the CUDA-graph path) must give the reference's tokens. A
  divergence passes only where the reference's top-2 margin at the first differing token is
  within twice the measured logit difference there (a near-tie), and says so.
- ``lm:bf16-logits``: the fast LM in bf16 vs the reference LM in float64 (bf16-rounded weights),
  B 8, T 64, every reference layer routed on the fast LM's router logits; bound FACTOR x the error
  of the reference LM run in bf16 by PyTorch (routed the same way). Reported besides: the error
  and argmax agreement against the float64 reference on its own routing, and per layer the share
  of tokens that the two route differently.
- ``lm:fla-argmax``: fla 0.6.0's MomForCausalLM with the same weights, bf16, same prompts: argmax
  agreement with momtune over all positions >= 99%. Prompts have T 64 because fla runs
  ``fused_recurrent`` at T <= 64 (no autotuning) and its chunk kernels autotune for minutes on a
  cold cache. Without fla: "skipped: fla not installed".

The bf16 and fla LM checks use weights trained for a few Adam steps (float32, PyTorch
reference, on the device) on momtune.synthetic's Markov language, and prompts drawn from it:
random-init logits are near-tied (each of momtune and fla agrees with float64's argmax on only
94-96% of positions), so argmax agreement on them measures bf16 rounding, not the kernels. The
fla row also reports the agreement on the untrained weights and uniformly random prompts.

``--tiny`` (automatic without CUDA): the ``tiny`` shape sets, the ``tiny`` model preset, float32
everywhere (the interpreter's bf16 tl.dot is not faithful), small batches; without CUDA the kernels
run in Triton's interpreter (TRITON_INTERPRET=1 is set if it was not) and the output says so.
Exit status 1 if any check fails, 0 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

GPU_SHAPE_SET = "mom-340m-prefill"
SET_OVERRIDES = {"decode": "decode"}  # templates whose real shapes live in another set
TINY_SET = "tiny"
FLA_AGREEMENT = 0.99
LM_CHECKS = ("lm:fp32-logits", "lm:fp32-generate", "lm:bf16-logits", "lm:fla-argmax")
LAYER_CHECK = "layer:prefill+decode"


# ---------------------------------------------------------------------------- mode and rows
@dataclass(frozen=True)
class Mode:
    """What the run uses: tiny (CPU / interpreter) or the real shapes on a GPU."""

    tiny: bool
    device: str
    dtype: torch.dtype  # the low precision of the run: bf16 on the GPU, float32 when tiny
    interpreter: bool
    seed: int = 0
    localize: bool = False  # run localize_lm even when the bf16 LM check passes

    # sizes of the layer and LM checks
    @property
    def layer_bt(self) -> tuple[int, int, int]:  # B, T, decode steps
        return (2, 21, 3) if self.tiny else (2, 257, 3)

    @property
    def preset(self) -> tuple[str, dict[str, Any]]:
        return ("tiny", {}) if self.tiny else ("mom-340m", {"num_hidden_layers": 4})

    @property
    def generate_shape(self) -> tuple[int, int, int]:  # B, T, new tokens
        return (2, 7, 3) if self.tiny else (2, 33, 16)

    @property
    def lm_shape(self) -> tuple[int, int]:  # B, T of the bf16 / fla logits
        return (2, 9) if self.tiny else (8, 64)

    @property
    def train_steps(self) -> int:  # Adam steps of the bf16 / fla LM's weights on the Markov language
        return 20 if self.tiny else 150


@dataclass
class Row:
    name: str
    shape: str = ""
    dtype: str = ""
    status: str = ""  # PASS | FAIL | SKIP ("" while running)
    rel_norm: float | None = None  # ||out - ref|| / ||ref|| (worst output)
    rel_max: float | None = None  # max |out - ref| / max |ref|
    max_abs: float | None = None
    bound: str = ""
    seconds: float = 0.0
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # traceback of an exception

    def done(self, ok: bool, detail: str = "") -> None:
        self.status = "PASS" if ok else "FAIL"
        if detail:
            self.detail = f"{self.detail}; {detail}" if self.detail else detail


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def fmt_shape(shape: Mapping[str, Any]) -> str:
    return " ".join(f"{k}{v}" for k, v in shape.items())


def last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in "".join(traceback.format_exception_only(type(exc), exc)).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_rows(rows: Sequence[Row], body: Callable[[], None], device: str | torch.device = "cpu") -> list[Row]:
    """Run ``body`` (which fills ``rows``) under no_grad; an exception fails every unfinished row
    with its last line. Each row's time is the time of the whole body (compiles included)."""
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            body()
        _sync(device)
    except Exception as exc:  # noqa: BLE001 - every failure is a row
        for row in rows:
            if not row.status:
                row.status, row.detail = "FAIL", last_line(exc)
                row.error = traceback.format_exc()
    for row in rows:
        if not row.status:
            row.status, row.detail = "FAIL", row.detail or "the check set no result"
        row.seconds = row.seconds or time.perf_counter() - t0
    return list(rows)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(||out - ref|| / ||ref||, max |out - ref| / max |ref|, max |out - ref|), in float64 on the device."""
    o, r = out.detach().to(torch.float64), ref.detach().to(device=out.device, dtype=torch.float64)
    d = o - r
    rn, mr = float(torch.linalg.vector_norm(r)), float(r.abs().max()) if r.numel() else 0.0
    dn, ma = float(torch.linalg.vector_norm(d)), float(d.abs().max()) if d.numel() else 0.0
    return _ratio(dn, rn), _ratio(ma, mr), ma


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _worst(row: Row, errs: Sequence[tuple[float, float, float]]) -> None:
    if errs:
        row.rel_norm = max(e[0] for e in errs)
        row.rel_max = max(e[1] for e in errs)
        row.max_abs = max(e[2] for e in errs)


def _all_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


# ---------------------------------------------------------------------------- (a) templates
def template_shape(name: str, mode: Mode) -> tuple[str, dict[str, int]]:
    """(set name, first shape of the set) from the template's search space."""
    from momtune.space import load_space

    space = load_space(name)
    set_name = TINY_SET if mode.tiny else SET_OVERRIDES.get(name, GPU_SHAPE_SET)
    if set_name not in space.shape_sets:
        raise KeyError(f"search space {name!r} has no shape set {set_name!r} (sets: {sorted(space.shape_sets)})")
    return set_name, dict(space.shape_sets[set_name].shapes[0])


def check_template(template: Any, shape: Mapping[str, int], dtype: torch.dtype, device: str | torch.device,
                   seed: int = 0, config: Mapping[str, Any] | None = None, row: Row | None = None) -> Row:
    """One template at one shape: default config (or ``config``), NaN-poisoned ``out=`` buffers,
    momtune.gate.check against the float64 reference with momtune.gate's derived bounds."""
    row = row or Row(f"template:{template.name}", fmt_shape(shape), dtype_name(dtype))
    row.shape, row.dtype = row.shape or fmt_shape(shape), dtype_name(dtype)

    def body() -> None:
        from momtune.gate import bounds_for, check
        from momtune.validate import poison_like

        cfg = dict(config) if config is not None else template.default_for(dtype)
        row.extra["config"] = cfg
        inputs = template.make_inputs(dict(shape), dtype, device, seed)
        first = template.launch(inputs, cfg)  # compiles, and gives the output buffers' shapes
        _sync(device)
        out = poison_like(first)
        del first
        res = template.launch(inputs, cfg, out=out)
        _sync(device)
        res = res if res is not None else out
        ref = template.reference(inputs)
        bounds = bounds_for(template, inputs, ref, res, dtype, str(device))
        verdict = check(res, ref, bounds)
        # the bound shown: the output nearest its own bound (the worst error is another's, maybe)
        near = max(((k, b) for k, b in bounds.items() if k in verdict.errors),
                   key=lambda kb: verdict.errors[kb[0]][0] / kb[1].norm, default=None)
        row.bound = f"{near[0]}: norm {near[1].norm:.2g} / elem {near[1].elem:.2g}" if near else "exact"
        row.extra["bounds"] = {k: {"norm": b.norm, "elem": b.elem, "source": b.source} for k, b in bounds.items()}
        row.extra["bound_source"] = "momtune.gate: per output, FACTOR x the reference's own error in the dtype"
        per_key, errs, int_bad = {}, [], {}
        for key, r in ref.items():
            o = res.get(key)
            if o is None or tuple(o.shape) != tuple(r.shape):
                continue
            if o.is_floating_point():
                e = errors(o, r)
                per_key[key] = {"rel_norm": e[0], "rel_max": e[1], "max_abs": e[2]}
                errs.append(e)
            else:
                int_bad[key] = int((o.to(torch.float64) != r.to(device=o.device, dtype=torch.float64)).sum())
        _worst(row, errs)
        row.extra.update(per_key=per_key, int_mismatches=int_bad)
        problems = [] if verdict.ok else [f"{verdict.kind}: {verdict.reason}"]
        nonfinite = _all_finite(res)
        if nonfinite:
            problems.append(f"non-finite elements in {nonfinite}")
        ignored = [k for k, buf in out.items() if k in res and res[k].data_ptr() != buf.data_ptr()]
        if ignored:
            problems.append(f"launch ignored out= for {ignored} (poisoned buffers unused)")
        row.done(not problems, "; ".join(problems))

    return run_rows([row], body, device)[0]


def check_registered_template(name: str, mode: Mode) -> Row:
    row = Row(f"template:{name}", dtype=dtype_name(mode.dtype))
    try:
        from momtune.kernels import get_template

        set_name, shape = template_shape(name, mode)
        template = get_template(name)
    except Exception as exc:  # noqa: BLE001
        row.status, row.detail, row.error = "FAIL", last_line(exc), traceback.format_exc()
        return row
    row.shape = fmt_shape(shape)
    row.extra["shape_set"] = set_name
    return check_template(template, shape, mode.dtype, mode.device, mode.seed, row=row)


# ---------------------------------------------------------------------------- (b) layer
F32_FLOOR = 1e-6  # a float32 reference's own error counts as at least this (rounding of a deep computation)


def check_layer(mode: Mode) -> Row:
    """Prefill by momtune.layer_check (float64 reference routed on the fast layer's own router
    logits; bound FACTOR x the reference's own error in the layer's dtype; router logits within
    FACTOR x the dtype reference's), then decode steps through the caches the same way: the fast
    layer, the float64 reference and the reference in the layer's dtype step in lockstep, both
    references routed on the fast layer's logits, so their caches hold the same memories."""
    import copy

    import momtune
    from momtune.bench import layer_kwargs
    from momtune.layer_check import FACTOR, check_layer as layer_numerics, pinned_router, tf32_matmuls
    from momtune.reference.cache import MoMCache

    B, T, steps = mode.layer_bt
    name, over = mode.preset
    cfg = momtune.MoMConfig.from_preset(name, **over)
    kw = layer_kwargs(cfg)
    row = Row(LAYER_CHECK, f"B{B} T{T} +{steps} steps D{cfg.hidden_size} H{cfg.num_heads} K{cfg.head_dim} "
                           f"E{cfg.num_memories} top{cfg.topk}{' shared' if cfg.shared_mem else ''}",
              dtype_name(mode.dtype))
    row.extra["bound_source"] = (f"momtune.layer_check: routing pinned to the fast layer's logits; "
                                 f"{FACTOR:g} x the reference's own error in {dtype_name(mode.dtype)}")

    def body() -> None:
        torch.manual_seed(mode.seed)
        fast = momtune.MoMAttention(**kw, backend="triton").to(mode.device).to(mode.dtype).eval()
        ref = momtune.reference.MoMAttention(**kw).to(mode.device).double().eval()
        ref.load_state_dict({k: v.double() for k, v in fast.state_dict().items()}, strict=True)
        x = torch.randn(B, T + steps, cfg.hidden_size, device=mode.device).to(mode.dtype)
        ck = layer_numerics(fast, ref, x[:, :T])
        row.extra["prefill"] = {k: v for k, v in vars(ck).items()}
        problems = [] if ck.ok else [f"prefill: {ck.describe()}"]

        # decode: three layers in lockstep through their own caches
        ref_dt = copy.deepcopy(ref).to(mode.dtype)
        tf32 = mode.dtype == torch.float32
        cf, cr, cd = MoMCache(), MoMCache(), MoMCache()
        out_f, lg = fast(x[:, :T], past_key_values=cf, use_cache=True)[:2]
        with pinned_router(ref, lg.double()):
            ref(x[:, :T].double(), past_key_values=cr, use_cache=True)
        with pinned_router(ref_dt, lg), tf32_matmuls(tf32):
            ref_dt(x[:, :T], past_key_values=cd, use_cache=True)
        errs, base, logit_errs, outs = [], [], [], [out_f]
        for i in range(T, T + steps):
            xt = x[:, i:i + 1]
            o_f, lg = fast(xt, past_key_values=cf, use_cache=True)[:2]
            with pinned_router(ref, lg.double()):
                o_r = ref(xt.double(), past_key_values=cr, use_cache=True)[0]
            with pinned_router(ref_dt, lg), tf32_matmuls(tf32):
                o_d = ref_dt(xt, past_key_values=cd, use_cache=True)[0]
            errs.append(errors(o_f, o_r))
            base.append(errors(o_d, o_r)[0])
            logit_errs.append(float((lg.double().reshape(B, -1) - ref.gate(xt.double()).reshape(B, -1)).abs().max()))
            outs.append(o_f)
        step_bound = FACTOR * max([ck.ref_rel_err, *base, F32_FLOOR])
        _worst(row, errs)
        row.rel_norm = max(row.rel_norm or 0.0, ck.rel_err)
        row.extra.update(step_rel_norm=[e[0] for e in errs], step_ref_rel_norm=base, step_bound=step_bound,
                         step_logit_err=logit_errs)
        row.bound = f"norm {ck.bound:.2g} / steps {step_bound:.2g}"
        problems += [f"non-finite output ({'prefill' if i == 0 else f'step {i}'})"
                     for i, o in enumerate(outs) if not bool(torch.isfinite(o).all())]
        over_bound = [i + 1 for i, e in enumerate(errs) if not e[0] <= step_bound]
        if over_bound:
            problems.append(f"decode steps {over_bound}: norm-wise {max(errs[i - 1][0] for i in over_bound):.3e} "
                            f"> {step_bound:.3e} ({FACTOR:g} x the {dtype_name(mode.dtype)} reference's error)")
        if max(logit_errs) > ck.logit_bound:
            problems.append(f"decode router logits max err {max(logit_errs):.2e} > {ck.logit_bound:.2e}")
        row.done(not problems, "; ".join(problems) or
                 f"prefill {ck.rel_err:.2e} (bound {ck.bound:.2e}, {ck.flips}/{ck.tokens} routing ties, unpinned "
                 f"{ck.free_rel_err:.2e}); decode steps max {max(e[0] for e in errs):.2e}")

    return run_rows([row], body, mode.device)[0]


# ---------------------------------------------------------------------------- (c) LM
def lm_config(mode: Mode) -> Any:
    import momtune

    name, over = mode.preset
    return momtune.MoMConfig.from_preset(name, **over)


_WEIGHTS: dict[tuple[str, int], dict[str, torch.Tensor]] = {}


def lm_weights(cfg: Any, seed: int) -> dict[str, torch.Tensor]:
    """A float32 state dict (CPU): the reference init, norm weights moved off 1 (a dropped weight
    shows); made once per (config, seed)."""
    import momtune

    key = (json.dumps(cfg.to_dict(), sort_keys=True), seed)
    if key in _WEIGHTS:
        return _WEIGHTS[key]
    torch.manual_seed(seed)
    model = momtune.reference.MoMForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and bool(torch.all(p == 1)):
                p.uniform_(0.5, 1.5)
    _WEIGHTS[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _WEIGHTS[key]


_TRAINED: dict[tuple[str, int], tuple[dict[str, torch.Tensor], Any, list[float]]] = {}


def trained_weights(mode: Mode, cfg: Any) -> tuple[dict[str, torch.Tensor], Any, list[float]]:
    """(float32 state dict on the CPU, its MarkovLanguage, the training losses): lm_weights
    trained in float32 on ``mode.device`` for ``mode.train_steps`` Adam steps on
    momtune.synthetic's Markov language, so that its logits have a trained LM's top-1 margins
    (random-init logits are near-tied: argmax comparisons on them measure bf16 rounding)."""
    from momtune.synthetic import MarkovLanguage, train_on

    key = (json.dumps(cfg.to_dict(), sort_keys=True), mode.seed)
    if key not in _TRAINED:
        lang = MarkovLanguage(cfg.vocab_size, seed=mode.seed)
        model = build_lm("reference", cfg, lm_weights(cfg, mode.seed), torch.float32, mode.device)
        with torch.enable_grad():
            losses = train_on(model, lang, steps=mode.train_steps, seed=mode.seed)
        state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
        del model
        _TRAINED[key] = (state, lang, losses)
    return _TRAINED[key]


def build_lm(kind: str, cfg: Any, state: Mapping[str, torch.Tensor], dtype: torch.dtype, device: str) -> Any:
    """``fast`` (momtune, Triton) or ``reference`` LM on ``device`` in ``dtype``, holding ``state``."""
    import momtune

    model = momtune.MoMForCausalLM(cfg, backend="triton") if kind == "fast" else momtune.reference.MoMForCausalLM(cfg)
    model.load_state_dict(dict(state), strict=True)
    return model.to(device=device, dtype=dtype).eval()


def rounded(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights as a ``dtype`` model holds them, widened to float64 (same weights, exact)."""
    return {k: v.to(dtype).to(torch.float64) for k, v in state.items()}


def check_lm_fp32(mode: Mode) -> list[Row]:
    """float32 fast LM vs float32 reference: logits (prefill and decode steps along the
    reference's tokens) and greedy generation."""
    B, T, new = mode.generate_shape
    cfg = lm_config(mode)
    shape = f"B{B} T{T} +{new} L{cfg.num_hidden_layers} D{cfg.hidden_size} vocab {cfg.vocab_size}"
    from momtune.layer_check import FACTOR

    logits_row = Row("lm:fp32-logits", shape, "float32", bound=f"norm {FACTOR + 1:g} x fp32 ref's")
    # a fast LM within FACTOR x the float32 reference's own error from float64 is within
    # (FACTOR + 1) x that error of the float32 reference (triangle inequality), per step; float32
    # router logits are ~1e-6 from float64, so routing is not pinned (a flip would fail the row)
    logits_row.extra["bound_source"] = (f"{FACTOR + 1:g} x the float32 reference LM's own norm-wise error from the "
                                        "float64 reference LM, at each step (prefill, then decode steps)")
    gen_row = Row("lm:fp32-generate", shape, "float32", bound="tokens identical (near-ties explained)")

    def body() -> None:
        from momtune.reference.cache import MoMCache

        t0 = time.perf_counter()
        state = lm_weights(cfg, mode.seed)
        fast = build_lm("fast", cfg, state, torch.float32, mode.device)
        ref = build_lm("reference", cfg, state, torch.float32, mode.device)
        gen = torch.Generator().manual_seed(mode.seed + 1)
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(mode.device)
        # logits along the reference's tokens, through each model's cache
        want = ref.generate(ids, new)
        cf, cr = MoMCache(), MoMCache()
        lf = [fast(ids, past_key_values=cf).logits]
        lr = [ref(ids, past_key_values=cr).logits]
        for s in range(new - 1):
            tok = want[:, T + s:T + s + 1]
            lf.append(fast(tok, past_key_values=cf).logits)
            lr.append(ref(tok, past_key_values=cr).logits)
        ref64 = build_lm("reference", cfg, state, torch.float64, mode.device)
        c64 = MoMCache()
        l64 = [ref64(ids, past_key_values=c64).logits]
        for s in range(new - 1):
            l64.append(ref64(want[:, T + s:T + s + 1], past_key_values=c64).logits)
        del ref64
        e32 = [errors(r, w)[0] for r, w in zip(lr, l64)]
        bounds = [(FACTOR + 1) * max(e, 2.0 ** -24) for e in e32]
        errs = [errors(a, b) for a, b in zip(lf, lr)]
        _worst(logits_row, errs)
        logits_row.bound = f"norm {min(bounds):.1e}-{max(bounds):.1e}"
        logits_row.extra["rel_norm_prefill"] = errs[0][0]
        logits_row.extra["rel_norm_steps"] = [e[0] for e in errs[1:]]
        logits_row.extra["rel_norm_fast_vs_f64"] = [errors(a, w)[0] for a, w in zip(lf, l64)]
        logits_row.extra["rel_norm_ref32_vs_f64"] = e32
        logits_row.extra["bounds"] = bounds
        bad = [i for i, e in enumerate(errs) if not e[0] <= bounds[i]]
        nonfinite = [i for i, t in enumerate(lf) if not bool(torch.isfinite(t).all())]
        where = ["prefill"] + [f"step {i}" for i in range(1, len(errs))]
        logits_row.done(not bad and not nonfinite,
                        (f"non-finite logits at {[where[i] for i in nonfinite]}; " if nonfinite else "")
                        + (f"over the bound at {[where[i] for i in bad]}" if bad else
                           f"prefill {errs[0][0]:.2e}, decode steps max {max([e[0] for e in errs[1:]] or [0.0]):.2e}"))
        _sync(mode.device)
        logits_row.seconds = time.perf_counter() - t0

        t_gen = time.perf_counter()
        got = fast.generate(ids, new, cuda_graph=True)
        _sync(mode.device)
        gen_row.extra["cuda_graph"] = torch.device(mode.device).type == "cuda"
        gen_row.extra["tokens_fast"] = got[:, T:].tolist()
        gen_row.extra["tokens_reference"] = want[:, T:].tolist()
        same = got.shape == want.shape and bool(torch.equal(got, want))
        n_same = int((got[:, T:] == want[:, T:]).sum()) if got.shape == want.shape else 0
        gen_row.extra["identical"] = same
        if same:
            gen_row.done(True, f"{n_same}/{B * new} tokens identical")
        elif got.shape != want.shape:
            gen_row.done(False, f"shape {tuple(got.shape)} != reference {tuple(want.shape)}")
        else:
            gen_row.done(*_near_tie(got, want, T, lf, lr, bad))
        gen_row.seconds = time.perf_counter() - t_gen

    rows = run_rows([logits_row, gen_row], body, mode.device)
    return rows


def _near_tie(got: torch.Tensor, want: torch.Tensor, T: int, lf: list[torch.Tensor], lr: list[torch.Tensor],
              bad_steps: list[int]) -> tuple[bool, str]:
    """Whether the first divergence of greedy decoding is a near-tie of the reference: at the
    first differing column c, for every row that differs, the reference's margin between its
    token and momtune's is within twice the measured logit difference at that step (and that
    step's logits are within the bound)."""
    diff = (got != want).any(0).nonzero()
    c = int(diff[0])
    if c < T:
        return False, f"the prompt came back changed (column {c})"
    j = c - T  # logits lf[j][:, -1] picked column c
    if j in bad_steps:
        return False, f"first different token at column {c} (step {j}), where the logits are over the bound"
    a, b = lf[j][:, -1].double(), lr[j][:, -1].double()
    notes, ok = [], True
    for r in (got[:, c] != want[:, c]).nonzero().flatten().tolist():
        tw, tg = int(want[r, c]), int(got[r, c])
        margin = float(b[r, tw] - b[r, tg])
        delta = float((a[r] - b[r]).abs().max())
        tie = margin <= 2 * delta * (1 + 1e-3) + 1e-9
        ok &= tie
        notes.append(f"row {r}: reference {tw} vs momtune {tg}, reference margin {margin:.3g} "
                     f"{'<=' if tie else '>'} 2 x max|dlogits| {2 * delta:.3g}")
    n_same = int((got[:, T:c] == want[:, T:c]).sum()) + int((got[:, c] == want[:, c]).sum())
    head = f"tokens identical up to column {c} ({n_same} of the first {got.shape[0] * (c - T + 1)})"
    tail = "a near-tie (bf16/tf32 noise, not a bug)" if ok else "not a near-tie"
    return ok, f"{head}; {'; '.join(notes)}: {tail}"


class LMBf16:
    """One batch of prompts through the bf16 (tiny: float32) fast LM, the float64 reference (on
    its own routing, and routed in every layer on the fast LM's router logits) and the reference
    run in the LM's dtype by PyTorch (routed the same way); built once, shared by the bf16 and fla
    checks. Weights: trained_weights (a trained LM's margins), one float32 state dict rounded to
    the dtype for every model; prompts drawn from the language it was trained on."""

    _cache: dict[Any, LMBf16] = {}

    @torch.no_grad()
    def __init__(self, mode: Mode) -> None:
        from momtune.layer_check import pinned_router, tf32_matmuls

        self.mode, self.cfg = mode, lm_config(mode)
        B, T = mode.lm_shape
        self.state, self.lang, self.losses = trained_weights(mode, self.cfg)
        gen = torch.Generator().manual_seed(mode.seed + 3)
        self.ids = self.lang.sample(B, T, generator=gen).to(mode.device)
        fast = build_lm("fast", self.cfg, self.state, mode.dtype, mode.device)
        out = fast(self.ids)
        self.fast, router = out.logits, [r.detach() for r in out.router_logits]
        del fast, out

        def pinned(model: Any, dtype: torch.dtype) -> contextlib.ExitStack:
            stack = contextlib.ExitStack()
            for block, logits in zip(model.model.layers, router):
                stack.enter_context(pinned_router(block.attn, logits.to(dtype)))
            return stack

        ref64 = build_lm("reference", self.cfg, rounded(self.state, mode.dtype), torch.float64, mode.device)
        free = ref64(self.ids)
        self.ref64, router64 = free.logits, [r.detach() for r in free.router_logits]
        with pinned(ref64, torch.float64):
            self.ref64_pinned = ref64(self.ids).logits
        del ref64, free
        k = self.cfg.topk
        self.routing_diff = [float(_topk_set(a, k).ne(_topk_set(b, k)).any(-1).double().mean())
                             for a, b in zip(router, router64)]
        ref_dt = build_lm("reference", self.cfg, self.state, mode.dtype, mode.device)
        with pinned(ref_dt, mode.dtype), tf32_matmuls(mode.dtype == torch.float32):
            self.ref_dt_pinned = ref_dt(self.ids).logits
        del ref_dt
        if _on_cuda(mode):
            torch.cuda.empty_cache()

    @classmethod
    def get(cls, mode: Mode) -> LMBf16:
        if mode not in cls._cache:
            cls._cache[mode] = cls(mode)
        return cls._cache[mode]


def _topk_set(logits: torch.Tensor, k: int) -> torch.Tensor:
    lg = logits.reshape(-1, logits.shape[-1]).double()
    return torch.zeros_like(lg, dtype=torch.bool).scatter_(1, lg.topk(k, -1).indices, True)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).double().mean())


@torch.no_grad()
def localize_lm(mode: Mode, lm: LMBf16) -> list[dict[str, Any]]:
    """Where the fast LM leaves the reference: every block (and the head) run alone on the float64
    LM's own hidden state (rounded to the dtype), the fast part against the reference run in the
    dtype, both against float64, routing pinned to the fast block's logits. Per part: the
    norm-wise error of the part's output increment (block: y - x) from float64, fast and reference."""
    from momtune.layer_check import check_layer, pinned_router

    dt, dev = mode.dtype, mode.device
    ref64 = build_lm("reference", lm.cfg, rounded(lm.state, dt), torch.float64, dev)
    fast = build_lm("fast", lm.cfg, lm.state, dt, dev)
    ref_dt = build_lm("reference", lm.cfg, lm.state, dt, dev)
    x64 = ref64.model.embeddings(lm.ids)
    out: list[dict[str, Any]] = []
    for i, (fb, rb, b64) in enumerate(zip(fast.model.layers, ref_dt.model.layers, ref64.model.layers)):
        x = x64.to(dt)
        xd = x.double()
        yf, lf = fb(x, None)
        with pinned_router(rb.attn, lf):
            yr = rb(x, None)[0]
        with pinned_router(b64.attn, lf.double()):
            y64 = b64(xd, None)[0]
        h = rb.attn_norm(x)
        att = check_layer(fb.attn, b64.attn, h)
        fla_chunk = _fla_chunk_attention(mode, lm, i, b64.attn, h)
        # the MLP half on the float64 post-attention state: fast (fused norm + swiglu + addmm) vs reference
        with pinned_router(b64.attn, lf.double()):
            mid64 = xd + b64.attn(b64.attn_norm(xd), None)[0]
        mid = mid64.to(dt)
        mlp64 = b64.mlp(b64.mlp_norm(mid.double()))
        mlp_dt = rb.mlp(rb.mlp_norm(mid))
        zero = torch.zeros_like(mid)
        mlp_fast = _fast_mlp(fb, mid, zero)
        out.append(dict(part=f"block {i}", x_rms=float(xd.pow(2).mean().sqrt()),
                        block_fast=errors(yf - x, y64 - xd)[0], block_ref_dtype=errors(yr - x, y64 - xd)[0],
                        attn_fast=att.rel_err, attn_ref_dtype=att.ref_rel_err, attn_flips=att.flips,
                        attn_fla_chunk=fla_chunk,
                        mlp_fast=errors(mlp_fast, mlp64)[0], mlp_ref_dtype=errors(mlp_dt, mlp64)[0]))
        x64 = y64
    x = x64.to(dt)
    head64 = ref64.lm_head(ref64.model.norm(x.double()))
    out.append(dict(part="head", x_rms=float(x64.pow(2).mean().sqrt()),
                    block_fast=errors(fast.lm_head(fast.model.norm(x)), head64)[0],
                    block_ref_dtype=errors(ref_dt.lm_head(ref_dt.model.norm(x)), head64)[0]))
    del ref64, fast, ref_dt
    return out


def _fla_chunk_attention(mode: Mode, lm: LMBf16, i: int, ref64: Any, h: torch.Tensor) -> float | None:
    """fla 0.6.0's MomAttention of block ``i`` on ``h``, forced into its chunk kernels (fla runs
    ``fused_recurrent`` at T <= 64 unless in training mode), against ``ref64`` routed on fla's
    router logits: the error a peer's chunked bf16 kernels have on the same sublayer (None
    without fla or CUDA)."""
    if not _on_cuda(mode):
        return None
    try:
        from momtune.bench import make_layer
        from momtune.layer_check import check_layer
    except ImportError:
        return None
    prefix = f"model.layers.{i}.attn."
    try:
        layer = make_layer("fla", lm.cfg, mode.dtype, {k[len(prefix):]: v for k, v in lm.state.items()
                                                       if k.startswith(prefix)})
    except ImportError:
        return None
    layer.train()  # chunk mode; the layer has no dropout

    class OutAndRouter(torch.nn.Module):
        def forward(self, x: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
            out = layer(x, **kw)
            return out[0], out[3]

    return check_layer(OutAndRouter(), ref64, h).rel_err


def _fast_mlp(block: Any, mid: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The fast block's MLP half on ``mid`` [B, T, D], as its forward runs it (norm kernel with
    the residual fused, swiglu kernel, down projection), returning the increment only."""
    import torch.nn.functional as F

    from momtune.model import cached_config
    from momtune.kernels.norm import add_rms_norm
    from momtune.kernels.swiglu import swiglu

    B, T, D = mid.shape
    N, dt, mlp = B * T, mid.dtype, block.mlp
    h, _ = add_rms_norm(zero.reshape(N, D), block.mlp_norm.weight, residual=mid.reshape(N, D), eps=block.mlp_norm.eps,
                        config=cached_config(block._configs, "norm", dict(N=N, D=D, residual=1), dt))
    I = mlp.gate_proj.weight.shape[0]
    a = swiglu(F.linear(h, mlp.gate_proj.weight), F.linear(h, mlp.up_proj.weight),
               config=cached_config(block._configs, "swiglu", dict(N=N, I=I), dt))
    return F.linear(a, mlp.down_proj.weight).view(B, T, D)


def check_lm_bf16(mode: Mode) -> Row:
    from momtune.layer_check import FACTOR

    B, T = mode.lm_shape
    row = Row("lm:bf16-logits", f"B{B} T{T} L{lm_config(mode).num_hidden_layers}", dtype_name(mode.dtype))

    def body() -> None:
        lm = LMBf16.get(mode)
        e = errors(lm.fast, lm.ref64_pinned)
        e_dt = errors(lm.ref_dt_pinned, lm.ref64_pinned)[0]
        bound = FACTOR * max(e_dt, F32_FLOOR)
        row.rel_norm, row.rel_max, row.max_abs = e
        row.bound = f"norm {bound:.2g}"
        free = errors(lm.fast, lm.ref64)[0]
        row.extra.update(
            bound_source=(f"{FACTOR:g} x the reference LM run in {dtype_name(mode.dtype)} by PyTorch "
                          f"({e_dt:.3e} from float64), every layer routed on the fast LM's router logits "
                          "(momtune.layer_check's rule)"),
            rel_norm_ref_dtype=e_dt, rel_norm_unpinned=free, argmax_agreement=agreement(lm.fast, lm.ref64),
            argmax_agreement_pinned=agreement(lm.fast, lm.ref64_pinned), routing_differs=lm.routing_diff)
        finite = bool(torch.isfinite(lm.fast).all())
        if not (finite and e[0] <= bound) or mode.localize:
            parts = row.extra["localized"] = localize_lm(mode, lm)
            for part in parts:
                print(f"  {part['part']}: " + ", ".join(f"{k} {v:.3e}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in part.items() if k != "part"), flush=True)
        row.done(finite and e[0] <= bound,
                 ("non-finite logits; " if not finite else "")
                 + f"unpinned: {free:.2e}, argmax agreement with float64 {row.extra['argmax_agreement']:.2%}; "
                   f"tokens routed otherwise than float64 per layer: "
                   + ", ".join(f"{d:.1%}" for d in lm.routing_diff))

    return run_rows([row], body, mode.device)[0]


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _on_cuda(mode: Mode) -> bool:
    return torch.device(mode.device).type == "cuda"


def check_lm_fla(mode: Mode) -> Row:
    B, T = mode.lm_shape
    row = Row("lm:fla-argmax", f"B{B} T{T} L{lm_config(mode).num_hidden_layers}", dtype_name(mode.dtype),
              bound=f"argmax agree >= {FLA_AGREEMENT:.0%}")
    if mode.tiny or not _on_cuda(mode):
        row.status, row.detail = "SKIP", "skipped: fla's kernels need CUDA (tiny / interpreter run)"
        return row
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import fla.models  # noqa: F401
    except ImportError as exc:
        row.status, row.detail = "SKIP", f"skipped: fla not installed ({last_line(exc)})"
        return row

    def body() -> None:
        from momtune.bench import make_model

        lm = LMBf16.get(mode)
        model = make_model("fla", lm.cfg, mode.dtype, lm.state)
        theirs = _logits(model(input_ids=lm.ids, use_cache=False))
        del model
        agree = agreement(lm.fast, theirs)
        e_mt, e_fla = errors(lm.fast, lm.ref64), errors(theirs, lm.ref64)
        a_mt, a_fla = agreement(lm.fast, lm.ref64), agreement(theirs, lm.ref64)
        row.rel_norm, row.rel_max, row.max_abs = errors(lm.fast, theirs)
        row.extra.update(argmax_agreement=agree, positions=int(lm.ids.numel()), rel_norm_momtune_vs_f64=e_mt[0],
                         rel_norm_fla_vs_f64=e_fla[0], argmax_momtune_vs_f64=a_mt, argmax_fla_vs_f64=a_fla,
                         train_steps=len(lm.losses), train_loss_first_last=[lm.losses[0], lm.losses[-1]],
                         successor_hit_momtune=lm.lang.successor_hit_rate(lm.ids, lm.fast),
                         successor_hit_fla=lm.lang.successor_hit_rate(lm.ids, theirs))
        # the same comparison on the untrained weights and uniformly random prompts (near-ties: reported only)
        gen = torch.Generator().manual_seed(mode.seed + 5)
        ids = torch.randint(0, lm.cfg.vocab_size, tuple(lm.ids.shape), generator=gen).to(mode.device)
        init = lm_weights(lm.cfg, mode.seed)
        fast = build_lm("fast", lm.cfg, init, mode.dtype, mode.device)
        mine = fast(ids).logits
        del fast
        model = make_model("fla", lm.cfg, mode.dtype, init)
        row.extra["argmax_agreement_random_init"] = agreement(mine, _logits(model(input_ids=ids, use_cache=False)))
        del model
        finite = bool(torch.isfinite(theirs).all())
        facts = (f"agreement {agree:.2%} of {lm.ids.numel()} (trained {len(lm.losses)} steps; random init "
                 f"{row.extra['argmax_agreement_random_init']:.2%}); vs float64: momtune {a_mt:.2%} / "
                 f"{e_mt[0]:.2e}, fla {a_fla:.2%} / {e_fla[0]:.2e}")
        if not finite:
            row.done(False, "fla's logits are not finite; " + facts)
        else:
            row.done(agree >= FLA_AGREEMENT, facts)

    return run_rows([row], body, mode.device)[0]


# ---------------------------------------------------------------------------- plan and report
def plan(mode: Mode) -> list[tuple[list[str], Callable[[], list[Row]]]]:
    """(row names, runner) of every check, in run order (fla last: it may autotune on a cold cache)."""
    from momtune.kernels import template_names

    out: list[tuple[list[str], Callable[[], list[Row]]]] = []
    for name in template_names():
        out.append(([f"template:{name}"], lambda n=name: [check_registered_template(n, mode)]))
    out.append(([LAYER_CHECK], lambda: [check_layer(mode)]))
    out.append((list(LM_CHECKS[:2]), lambda: check_lm_fp32(mode)))
    out.append(([LM_CHECKS[2]], lambda: [check_lm_bf16(mode)]))
    out.append(([LM_CHECKS[3]], lambda: [check_lm_fla(mode)]))
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2e}" if math.isfinite(x) else str(x))


def table(rows: Sequence[Row]) -> list[str]:
    head = ("check", "shape", "dtype", "rel norm", "max|d|/max|ref|", "bound", "s", "result")
    cells = [head] + [(r.name, r.shape, r.dtype, _num(r.rel_norm), _num(r.rel_max), r.bound, f"{r.seconds:.1f}",
                       r.status) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            self.lines.append(line)
            print(line, flush=True)


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def resolve_mode(tiny: bool, seed: int, localize: bool = False) -> Mode:
    """CUDA if available (not in the interpreter), else tiny on the CPU in Triton's interpreter."""
    from momtune.settings import interpreter_mode

    cuda = torch.cuda.is_available() and not interpreter_mode()
    if not cuda and not interpreter_mode():
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    interp = interpreter_mode()
    tiny = tiny or interp or not cuda
    return Mode(tiny=tiny, device="cuda" if cuda else "cpu", dtype=torch.float32 if tiny else torch.bfloat16,
                interpreter=interp, seed=seed, localize=localize)


def selected(names: list[str], only: list[str]) -> bool:
    """Whether ``--only`` takes a check of these row names: each entry is a name, or a prefix that
    ends at one of its ':' parts ("template" takes template:norm; "template:norm" does not take
    template:norm_bwd); no entries take everything."""
    return not only or any(n == o or n.startswith(o.rstrip(":") + ":") for n in names for o in only)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="checks: template:<name> (each registered template), "
                                        f"{LAYER_CHECK}, {', '.join(LM_CHECKS)}")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes, preset 'tiny', float32 (automatic without CUDA: Triton interpreter)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file: rows, log, provenance (default $OUT/gpu-smoke.json when $OUT is set)")
    ap.add_argument("--only", default="", help="comma-separated check names, or their prefixes up to a ':' "
                    "(e.g. template,layer: every template row and the layer's)")
    ap.add_argument("--no-fla", action="store_true", help="leave out the fla comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--localize", action="store_true",
                    help="lm:bf16-logits also reports every block's error (it does when it fails)")
    args = ap.parse_args(argv)
    out_path = args.out or (Path(os.environ["OUT"]) / "gpu-smoke.json" if os.environ.get("OUT") else None)

    t_start = time.perf_counter()
    mode = resolve_mode(args.tiny, args.seed, args.localize)
    torch.manual_seed(args.seed)
    from momtune.provenance import collect

    log = Log()
    prov = collect(0 if mode.device == "cuda" else None)
    where = ("Triton INTERPRETER on the CPU (timings are interpreter timings)" if mode.interpreter
             else f"{prov['gpu']} (sm {prov.get('capability')})")
    log(f"momtune GPU smoke: {'tiny' if mode.tiny else 'real'} shapes, {dtype_name(mode.dtype)}, {where}")
    log(f"torch {prov['torch']}, triton {prov['triton']}, cuda {prov['cuda']}, momtune {prov['momtune']}, "
        f"commit {prov['commit']}")
    if os.environ.get("MOMTUNE_LIBRARY"):
        log(f"MOMTUNE_LIBRARY={os.environ['MOMTUNE_LIBRARY']}: the layer and LM use its configs; "
            "the template rows use each template's default")
    payload: dict[str, Any] = {"tool": "bench/gpu_smoke.py", "mode": "tiny" if mode.tiny else "gpu",
                               "interpreter": mode.interpreter, "device": mode.device, "dtype": dtype_name(mode.dtype),
                               "seed": mode.seed, "provenance": prov, "rows": [], "log": log.lines}
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    rows: list[Row] = []
    for names, runner in plan(mode):
        if not selected(names, only):
            continue
        if args.no_fla and names == [LM_CHECKS[3]]:
            continue
        try:
            got = runner()
        except Exception as exc:  # noqa: BLE001 - a check that failed before making its rows
            got = [Row(n, status="FAIL", detail=last_line(exc), error=traceback.format_exc()) for n in names]
        for r in got:
            log(f"[{r.status}] {r.name} ({r.seconds:.1f} s){': ' + r.detail if r.detail else ''}")
        rows += got
        payload["rows"] = [asdict(r) for r in rows]
        payload["seconds"] = time.perf_counter() - t_start
        write_json(out_path, payload)
    failed = [r.name for r in rows if r.status == "FAIL"]
    log("")
    for line in table(rows):
        log(line)
    total = time.perf_counter() - t_start
    verdict = f"FAIL: {', '.join(failed)}" if failed else "all checks passed" + (
        f" ({sum(r.status == 'SKIP' for r in rows)} skipped)" if any(r.status == "SKIP" for r in rows) else "")
    if any(r.name.startswith("template:") for r in rows):
        log("template bounds: momtune.gate, per output FACTOR x the float64 reference's error when computed in "
            "float32 and rounded to the kernel's dtype (norm-wise / element-wise; the output nearest its bound shown)")
    log(f"{len(rows)} checks in {total:.1f} s{' (interpreter)' if mode.interpreter else ''}: {verdict}")
    if out_path is not None:
        log(f"wrote {out_path}")
    payload.update(rows=[asdict(r) for r in rows], seconds=total, ok=not failed, failed=failed)
    write_json(out_path, payload)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
