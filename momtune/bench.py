"""End-to-end benchmarks: the MoM layer (prefill, decode) and the causal LM (decode), momtune vs
flash-linear-attention 0.6.0 vs the PyTorch reference, side by side in one run.

Rows follow ``docs/DATA_FORMATS.md`` (bench file). Every implementation is timed the same way
(:func:`stable_time`): called until two successive rounds' medians agree within 3% (fla autotunes
each new shape on its first calls; a first call also compiles), then at least 30 calls timed one
by one with CUDA events; a row gives the median and the min-max spread. The headline compares
eager calls with eager calls; where both sides can be captured, CUDA graph replays are compared
with CUDA graph replays (``graph_ms``; a side that cannot be captured says why in ``note``). Peak
memory is ``max_memory_allocated`` above what was allocated before the call. fla's chunk backward
refuses Triton < 3.7.1 on Hopper, so only forward and decode are compared.
"""
from __future__ import annotations

import gc
import inspect
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from momtune.errors import InputError
from momtune.validate import first_line

IMPLS = ("momtune", "fla", "reference", "flashinfer")
KINDS = ("layer_prefill", "layer_decode", "model_decode", "layer_train", "model_train", "recurrence")
#: who has what: FlashInfer has the gated-delta recurrence (prefill) but no MoM layer or model
RECURRENCE_IMPLS = ("momtune", "fla", "flashinfer")
STABLE = 0.03  # two successive warm-up medians within 3%: warm
MIN_CALLS = 30  # timed calls per measurement


@dataclass(frozen=True)
class Measured:
    median_ms: float
    min_ms: float
    max_ms: float
    calls: int
    warmup_rounds: int  # rounds of calls before two medians agreed within STABLE

    def fields(self, prefix: str = "") -> dict[str, Any]:
        """Row fields: ``ms`` (or ``<prefix>_ms``), its min, max, number of calls, warm-up rounds."""
        p = f"{prefix}_" if prefix else ""
        return {f"{p}ms": self.median_ms, f"{p}ms_min": self.min_ms, f"{p}ms_max": self.max_ms,
                f"{p}calls": self.calls, f"{p}warmup_rounds": self.warmup_rounds}


def cuda_call_ms(fn: Callable[[], Any]) -> float:
    """One call of ``fn`` timed with CUDA events (the GPU's time from the first launch to the end)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


def stable_time(fn: Callable[[], Any], calls: int = MIN_CALLS, tol: float = STABLE, max_rounds: int = 20,
                budget_ms: float = 60_000.0, timer: Callable[[Callable[[], Any]], float] = cuda_call_ms) -> Measured:
    """Warm ``fn`` until two successive rounds' medians agree within ``tol``, then time ``calls``
    calls one by one; median and min-max of those. A round is ``calls`` calls, fewer for a slow
    ``fn`` (at least 3, about ``budget_ms / (2 * max_rounds)`` per round); after ``max_rounds``
    rounds without agreement the last round is used and ``warmup_rounds`` says so (= max_rounds)."""
    timer(fn)  # compiles, autotunes: never counted
    second = timer(fn)  # sizes the rounds (the first call's compile time would make them too short)
    per_round = max(3, min(calls, int(budget_ms / (2 * max_rounds) / max(second, 1e-3))))
    prev: float | None = None
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        med = statistics.median(timer(fn) for _ in range(per_round))
        if prev is not None and abs(med - prev) <= tol * max(prev, 1e-9):
            break
        prev = med
    times = [timer(fn) for _ in range(max(calls, 3))]
    return Measured(statistics.median(times), min(times), max(times), len(times), rounds)


def _median_ms(fn: Callable[[], Any], warmup: int = 10, rep: int = 50) -> float:
    """Kept for scripts under bench/: ``stable_time(fn).median_ms``."""
    return stable_time(fn).median_ms


def _peak_mb(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def layer_kwargs(cfg: Any) -> dict[str, Any]:
    return dict(hidden_size=cfg.hidden_size, head_dim=cfg.head_dim, num_heads=cfg.num_heads, expand_v=cfg.expand_v,
                num_memories=cfg.num_memories, topk=cfg.topk, shared_mem=cfg.shared_mem, norm_eps=cfg.norm_eps,
                conv_size=cfg.conv_size, layer_idx=0)


def make_layer(impl: str, cfg: Any, dtype: torch.dtype, state: dict | None) -> torch.nn.Module:
    """A layer of ``impl`` on CUDA in ``dtype``; all impls share one state_dict (strict load)."""
    import momtune

    if impl not in ("momtune", "reference", "fla"):
        raise InputError(f"impl: {impl!r} has no MoM layer; layers are momtune, fla and reference")
    kw = layer_kwargs(cfg)
    if impl == "momtune":
        layer = momtune.MoMAttention(**kw, backend="triton")
    elif impl == "reference":
        layer = momtune.reference.MoMAttention(**kw)
    elif impl == "fla":
        from fla.layers import MomAttention as FlaMom

        layer = FlaMom(**kw)
    if state is not None:
        layer.load_state_dict(state, strict=True)
    return layer.cuda().to(dtype).eval()


def make_model(impl: str, cfg: Any, dtype: torch.dtype, state: dict | None) -> torch.nn.Module:
    import momtune

    if impl == "momtune":
        model = momtune.MoMForCausalLM(cfg, backend="triton")
    elif impl == "reference":
        model = momtune.reference.MoMForCausalLM(cfg)
    elif impl == "fla":
        from fla.models import MomConfig as FlaConfig, MomForCausalLM as FlaLM

        names = set(inspect.signature(FlaConfig.__init__).parameters)
        fcfg = FlaConfig(**{k: v for k, v in cfg.to_dict().items() if k in names})
        model = FlaLM(fcfg)
    else:
        raise InputError(f"impl: {impl!r} has no MoM model; models are momtune, fla and reference")
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.cuda().to(dtype).eval()


def _fla_cache():
    from fla.models.utils import Cache

    return Cache()


def _row(kind: str, name: str, shape: dict, dtype: torch.dtype, impl: str, **kw: Any) -> dict[str, Any]:
    row = dict(kind=kind, name=name, shape=shape, dtype=str(dtype).replace("torch.", ""), impl=impl)
    row.update({k: v for k, v in kw.items() if v is not None})
    return row


@torch.no_grad()
def bench_layer_prefill(preset: str, B: int, T: int, impls: Iterable[str], dtype: torch.dtype) -> list[dict]:
    """One layer's eval forward on x [B, T, D]; reports ms, tokens/s, peak memory and the max
    relative error of each impl against momtune's output (a cross-check, not a reference)."""
    from momtune.reference.config import MoMConfig

    cfg = MoMConfig.from_preset(preset)
    torch.manual_seed(0)
    state = make_layer("reference", cfg, torch.float32, None).state_dict()
    x = cuda_randn((B, T, cfg.hidden_size), dtype)
    rows, outs = [], {}
    for impl in impls:
        try:
            layer = make_layer(impl, cfg, dtype, state)
            fn = lambda: layer(x)  # noqa: E731
            outs[impl] = fn()[0].float()
            m = stable_time(fn, calls=MIN_CALLS if impl != "reference" else 5)  # the reference: seconds a call
            rows.append(_row("layer_prefill", preset, dict(B=B, T=T), dtype, impl, **m.fields(),
                             tokens_per_s=B * T / m.median_ms * 1e3, peak_mem_mb=_peak_mb(fn)))
        except Exception as exc:  # one impl failing must not lose the others' numbers
            rows.append(_row("layer_prefill", preset, dict(B=B, T=T), dtype, impl, note=f"failed: {exc!s:.200}"))
        finally:
            layer = None
            gc.collect()
            torch.cuda.empty_cache()
    base = outs.get("momtune")
    for row in rows:
        o = outs.get(row["impl"])
        if base is not None and o is not None and row["impl"] != "momtune":
            row["max_rel_err_vs_momtune"] = float((o - base).norm() / base.norm())
    return rows


def bench_layer_train(preset: str, B: int, T: int, impls: Iterable[str], dtype: torch.dtype) -> list[dict]:
    """One layer's training step on x [B, T, D] (issue 14): forward with autograd recording, then
    backward of the output against a fixed random gradient (every parameter's and x's gradient).
    Per impl: ``ms`` (forward + backward), ``fwd_ms`` (the recording forward alone), the
    activation memory the step adds (``peak_mem_mb``), and the relative error of each impl's
    gradients (all parameters, then x) against momtune's (a cross-check, not a reference). fla's
    chunk backward refuses Triton < 3.7.1 on Hopper: its row then says so (``note``)."""
    from momtune.reference.config import MoMConfig

    cfg = MoMConfig.from_preset(preset)
    torch.manual_seed(0)
    state = make_layer("reference", cfg, torch.float32, None).state_dict()
    x = cuda_randn((B, T, cfg.hidden_size), dtype, seed=1).requires_grad_(True)
    dy = cuda_randn((B, T, cfg.hidden_size), dtype, seed=2)
    rows, grads = [], {}
    for impl in impls:
        layer = None
        try:
            layer = make_layer(impl, cfg, dtype, state).train()
            if impl == "momtune":
                layer.backend = "auto"  # trains on the kernels (a plain prefill)
            params = [p for _, p in sorted(layer.named_parameters())]

            def forward() -> torch.Tensor:
                return layer(x)[0]

            def step() -> tuple[torch.Tensor, ...]:
                return torch.autograd.grad(forward(), [*params, x], dy)

            got = step()
            grads[impl] = torch.cat([g.float().flatten() for g in got])
            fwd = stable_time(forward, calls=MIN_CALLS if impl != "reference" else 5)
            m = stable_time(step, calls=MIN_CALLS if impl != "reference" else 5)
            rows.append(_row("layer_train", preset, dict(B=B, T=T), dtype, impl, **m.fields(),
                             **fwd.fields("fwd"), tokens_per_s=B * T / m.median_ms * 1e3, peak_mem_mb=_peak_mb(step)))
        except Exception as exc:  # one impl failing must not lose the others' numbers
            rows.append(_row("layer_train", preset, dict(B=B, T=T), dtype, impl,
                             note=f"failed: {type(exc).__name__}: {exc!s:.200}"))
        finally:
            layer = None
            gc.collect()
            torch.cuda.empty_cache()
    base = grads.get("momtune")
    for row in rows:
        g = grads.get(row["impl"])
        if base is not None and g is not None and row["impl"] != "momtune":
            row["max_rel_err_vs_momtune"] = float((g - base).norm() / base.norm())
    return rows


@torch.no_grad()
def bench_layer_decode(preset: str, B: int, impls: Iterable[str], dtype: torch.dtype, prompt: int = 16) -> list[dict]:
    """One layer's decode step (one token per sequence) after a prompt of ``prompt`` tokens."""
    from momtune.reference.cache import MoMCache
    from momtune.reference.config import MoMConfig

    cfg = MoMConfig.from_preset(preset)
    torch.manual_seed(0)
    state = make_layer("reference", cfg, torch.float32, None).state_dict()
    x = cuda_randn((B, prompt + 1, cfg.hidden_size), dtype)
    rows = []
    for impl in impls:
        try:
            layer = make_layer(impl, cfg, dtype, state)
            if impl == "fla":
                cache = _fla_cache()
                layer(x[:, :prompt], past_key_values=cache, use_cache=True)
            else:
                cache = MoMCache()
                layer(x[:, :prompt], past_key_values=cache)
            xt = x[:, prompt:]
            step = lambda: layer(xt, past_key_values=cache, use_cache=True)  # noqa: E731
            m = stable_time(step)
            extra = _graph_fields(step)  # graph against graph, where this impl can be captured
            rows.append(_row("layer_decode", preset, dict(B=B), dtype, impl, **m.fields(),
                             tokens_per_s=B / m.median_ms * 1e3, peak_mem_mb=_peak_mb(step), **extra))
        except Exception as exc:
            rows.append(_row("layer_decode", preset, dict(B=B), dtype, impl, note=f"failed: {exc!s:.200}"))
        finally:
            layer = cache = None
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def _graph_ms(step: Callable[[], Any]) -> Measured:
    """``step`` captured in a CUDA graph, 10 calls per replay: per-call times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            step()
    m = stable_time(g.replay)
    return Measured(m.median_ms / 10, m.min_ms / 10, m.max_ms / 10, m.calls * 10, m.warmup_rounds)


def _graph_fields(step: Callable[[], Any]) -> dict[str, Any]:
    """``graph_ms`` (and spread) of ``step`` in a CUDA graph, or a note saying why it cannot be
    captured (an implementation that syncs with the host or allocates, e.g.)."""
    try:
        return _graph_ms(step).fields("graph")
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        torch.cuda.synchronize()
        _close_failed_capture()
        return {"note": f"no CUDA graph: capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"}


def _close_failed_capture() -> None:
    """After a capture that failed, capture an empty graph. A failed ``torch.cuda.graph`` never
    reaches the CUDA generator's capture epilogue (torch 2.11), so the generator stays marked as
    capturing and the next random op on the device raises "Offset increment outside graph capture
    encountered unexpectedly" (seen on the H200, 2026-11-29); a capture that ends closes that
    state where the generator keeps one flag. The benchmarks' inputs come from a CPU generator
    (:func:`cuda_randn`) either way, so they never depend on this."""
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pass
    except Exception:  # noqa: BLE001 - best effort: nothing here needs the device generator
        torch.cuda.synchronize()


def _cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cuda_randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, device: str = "cuda") -> torch.Tensor:
    """Standard-normal benchmark inputs drawn on the CPU from ``seed`` and copied to ``device``:
    the same for every implementation and run, and independent of the device's random generator
    (which a failed CUDA-graph capture can leave unusable, see :func:`_close_failed_capture`)."""
    return torch.randn(shape, generator=_cpu_generator(seed), dtype=torch.float32).to(device, dtype)


def cuda_randint(high: int, shape: tuple[int, ...], seed: int = 0, device: str = "cuda") -> torch.Tensor:
    """Token ids in [0, high) drawn on the CPU from ``seed`` and copied to ``device`` (as :func:`cuda_randn`)."""
    return torch.randint(0, high, shape, generator=_cpu_generator(seed)).to(device)


def bench_model_train(preset: str, B: int, T: int, impls: Iterable[str], dtype: torch.dtype,
                      layers: int | None = None) -> list[dict]:
    """One optimizer step of the causal LM on ids [B, T] (issue 14): forward with labels (the
    cross-entropy and, where the model has one, the router's aux loss), backward, AdamW step.
    Per impl: ``ms`` a step, tokens per second and the step's peak memory over the weights and
    optimizer state. Every impl starts from the same weights; the steps change them, so only the
    first step's losses are compared (``loss``; a cross-check, not a reference)."""
    from momtune.reference.config import MoMConfig

    overrides = {} if layers is None else dict(num_hidden_layers=layers)
    cfg = MoMConfig.from_preset(preset, **overrides)
    torch.manual_seed(0)
    ids = cuda_randint(cfg.vocab_size, (B, T))
    rows, state = [], None
    shape = dict(B=B, T=T, layers=cfg.num_hidden_layers)
    for impl in impls:
        model = opt = None
        try:
            model = make_model(impl, cfg, dtype, state).train()
            if state is None:
                state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
            if impl == "momtune":
                model.backend = "auto"
                for m in model.modules():
                    if hasattr(m, "backend"):
                        m.backend = "auto"  # trains on the kernels
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def step() -> float:
                opt.zero_grad(set_to_none=True)
                out = model(ids, labels=ids)
                out.loss.backward()
                opt.step()
                return out.loss

            first = float(step())
            m = stable_time(step, calls=MIN_CALLS if impl != "reference" else 5)
            rows.append(_row("model_train", preset, shape, dtype, impl, **m.fields(), loss=first,
                             tokens_per_s=B * T / m.median_ms * 1e3, peak_mem_mb=_peak_mb(step)))
        except Exception as exc:  # one impl failing must not lose the others' numbers
            rows.append(_row("model_train", preset, shape, dtype, impl,
                             note=f"failed: {type(exc).__name__}: {exc!s:.200}"))
        finally:
            model = opt = None
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def bench_model_decode(preset: str, B: int, impls: Iterable[str], dtype: torch.dtype, prompt: int = 16,
                       layers: int | None = None) -> list[dict]:
    """The causal LM's decode step (ms per token, all layers); momtune's in a CUDA graph."""
    from momtune.lm import DecodeGraph
    from momtune.reference.cache import MoMCache
    from momtune.reference.config import MoMConfig

    overrides = {} if layers is None else dict(num_hidden_layers=layers)
    cfg = MoMConfig.from_preset(preset, **overrides)
    torch.manual_seed(0)
    rows = []
    state = None
    ids = cuda_randint(cfg.vocab_size, (B, prompt + 1))
    for impl in impls:
        model = cache = None
        try:
            model = make_model(impl, cfg, dtype, state)
            if state is None:
                state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
            extra: dict[str, Any] = {}
            if impl == "fla":
                cache = model(ids[:, :prompt], use_cache=True).past_key_values
                step = lambda: model(ids[:, prompt:], past_key_values=cache, use_cache=True)  # noqa: E731
                m = stable_time(step)  # eager, the headline
                extra = _graph_fields(step)
            else:
                cache = MoMCache()
                model(ids[:, :prompt], past_key_values=cache)
                step = lambda: model(ids[:, prompt:], past_key_values=cache)  # noqa: E731
                m = stable_time(step)  # eager, the headline
                if impl == "momtune":  # the whole step as one graph replay, as generate runs it
                    graph = DecodeGraph(model, cache, B, ids.dtype)
                    extra = stable_time(lambda: graph.step(ids[:, prompt:])).fields("graph")
            rows.append(_row("model_decode", preset, dict(B=B, layers=cfg.num_hidden_layers), dtype, impl,
                             **m.fields(), tokens_per_s=B / m.median_ms * 1e3, peak_mem_mb=_peak_mb(step), **extra))
        except Exception as exc:
            rows.append(_row("model_decode", preset, dict(B=B, layers=cfg.num_hidden_layers), dtype, impl,
                             note=f"failed: {exc!s:.200}"))
        finally:
            model = cache = step = graph = None
            gc.collect()
            torch.cuda.empty_cache()
    return rows


RECURRENCE_SHAPE_KEYS = ("N", "S", "H", "K", "V")


def recurrence_shapes(set_name: str) -> list[dict[str, int]]:
    """The recurrence's shapes of a shape set of its search space (e.g. mom-340m-prefill, fla-varlen),
    or one shape written as a study names it, ``N32768-S8-H16-K128-V128`` (N tokens in S segments
    of equal length, H heads, head sizes K and V: e.g. FlashInfer's gated-delta prefill, which takes
    head size 128 only, against momtune and fla on a shape it runs; a set of the search space would
    add its shapes to the compile gate)."""
    import re

    from momtune.space import load_space

    sets = load_space("recurrence").shape_sets
    if set_name in sets:
        return [dict(s) for s in sets[set_name].shapes]
    m = re.fullmatch(r"N(\d+)-S(\d+)-H(\d+)-K(\d+)-V(\d+)", set_name)
    if m is None:
        raise InputError(f"recurrence shape set {set_name!r} is not one of {', '.join(sorted(sets))}, nor a shape "
                         "written N<tokens>-S<segments>-H<heads>-K<key size>-V<value size> (e.g. "
                         "N32768-S8-H16-K128-V128)")
    shape = dict(zip(RECURRENCE_SHAPE_KEYS, (int(g) for g in m.groups())))
    if min(shape.values()) < 1 or shape["S"] > shape["N"]:
        raise InputError(f"recurrence shape {set_name!r}: every size must be at least 1 and S (segments) at most N "
                         "(tokens)")
    return [shape]


def fla_recurrence(inp: dict[str, Any]) -> Callable[[], dict]:
    """fla's ``chunk_gated_delta_rule`` (varlen, q and k L2-normalised in its kernel) on the
    recurrence template's inputs, as one call returning {"o", "final_state"}."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    q, k, v, g, b = (inp[x][None] for x in ("q", "k", "v", "g", "beta"))
    cu = inp["cu_seqlens"].long()

    def run() -> dict[str, torch.Tensor]:
        o, ht = chunk_gated_delta_rule(q, k, v, g, b, initial_state=inp["initial_state"], output_final_state=True,
                                       use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
        return {"o": o[0], "final_state": ht}

    return run


def flashinfer_recurrence(inp: dict[str, Any], chunk_fn: Callable[..., Any] | None = None) -> Callable[[], dict]:
    """FlashInfer's gated-delta-rule prefill (``flashinfer.gdn_prefill.chunk_gated_delta_rule``, its
    SM90 CUTLASS kernel) on the recurrence template's inputs, as one call: q and k L2-normalised
    first (momtune and fla normalise inside their kernels; FlashInfer's SM90 path does not, so the
    normalisation is part of the timed call), then the kernel. What a model using FlashInfer keeps
    in FlashInfer's own conventions is prepared once, outside the call: the decay as a factor,
    alpha = exp(g), beta in float32, int64 cu_seqlens, and the state in its [S, H, V, K] layout
    (the returned final state is turned back to [S, H, K, V] for the check, not in the call).
    ``chunk_fn``: the kernel (default: FlashInfer's, imported here)."""
    from momtune.reference.recurrence import L2_EPS

    if chunk_fn is None:
        from flashinfer.gdn_prefill import chunk_gated_delta_rule as chunk_fn
    q, k, v = inp["q"], inp["k"], inp["v"]
    alpha = inp["g"].float().exp().contiguous()
    beta = inp["beta"].float().contiguous()
    cu = inp["cu_seqlens"].long()
    h0 = inp["initial_state"].float().transpose(-1, -2).contiguous() if inp.get("initial_state") is not None else None
    scale = inp.get("scale") or q.shape[-1] ** -0.5

    def normed(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + L2_EPS)).to(x.dtype).contiguous()

    def run() -> dict[str, torch.Tensor]:
        o, ht = chunk_fn(normed(q), normed(k), v, g=alpha, beta=beta, scale=scale, initial_state=h0,
                         output_final_state=True, cu_seqlens=cu)
        return {"o": o, "final_state_vk": ht}

    return run


def _recurrence_impl(impl: str, tpl: Any, inp: dict, shape: dict, dtype: torch.dtype) -> tuple[Callable, dict]:
    """(call, row extras) of one implementation of the recurrence on the template's inputs."""
    if impl == "momtune":  # the config the layer would run: the tuned library's (or the default)
        from momtune.dispatch import get_dispatcher

        cfg, source = get_dispatcher().config(tpl, shape, dtype)
        return (lambda: tpl.launch(inp, cfg)), {"config": dict(cfg), "config_source": source}
    if impl == "fla":
        return fla_recurrence(inp), {}
    if impl == "flashinfer":
        return flashinfer_recurrence(inp), {"how": "q, k L2-normalised by torch in the call; alpha = exp(g) and "
                                                   "the [V, K] state layout prepared outside it"}
    raise InputError(f"impl: {impl!r} has no recurrence here; use {', '.join(RECURRENCE_IMPLS)}")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@torch.no_grad()
def bench_recurrence(set_name: str, shape: dict[str, int], impls: Iterable[str], dtype: torch.dtype,
                     peaks: dict[str, Any] | None = None) -> list[dict]:
    """The chunked gated-delta recurrence alone (issue 12): momtune (with the tuned library's config
    for the shape), fla's ``chunk_gated_delta_rule`` and FlashInfer's SM90 prefill on the same
    inputs. Per impl: eager time (the headline) and CUDA graph time where it can be captured, the
    floor from this GPU's measured peaks and the time over it, and the norm-wise errors of o and
    the final state against the float64 reference."""
    from momtune.kernels import get_template
    from momtune.timing import floor_ms

    tpl = get_template("recurrence")
    inp = tpl.make_inputs(shape, dtype, "cuda", 0)
    ref = tpl.reference(inp)
    flops, nbytes = tpl.cost(shape, dtype)
    floor = floor_ms(flops, nbytes, peaks)
    rows = []
    for impl in impls:
        fn = None
        try:
            fn, extra = _recurrence_impl(impl, tpl, inp, shape, dtype)
            out = fn()
            torch.cuda.synchronize()
            state = out["final_state"] if "final_state" in out else out["final_state_vk"].transpose(-1, -2)
            errs = {"rel_err_o": _rel(out["o"], ref["o"]), "rel_err_state": _rel(state, ref["final_state"])}
            m = stable_time(fn)
            graph = _graph_fields(fn)
            rows.append(_row("recurrence", set_name, shape, dtype, impl, **m.fields(), **graph, floor_ms=floor,
                             x_floor=m.median_ms / floor, **errs, **extra))
        except Exception as exc:  # one impl failing must not lose the others' numbers
            rows.append(_row("recurrence", set_name, shape, dtype, impl, floor_ms=floor,
                             note=f"failed: {first_line(exc, 240)}"))
        finally:
            fn = None
            gc.collect()
            torch.cuda.empty_cache()
    return rows
