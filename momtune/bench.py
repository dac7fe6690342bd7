"""End-to-end benchmarks: the MoM layer (prefill, decode) and the causal LM (decode), momtune vs
flash-linear-attention 0.6.0 vs the PyTorch reference, side by side in one run.

Rows follow ``docs/DATA_FORMATS.md`` (bench file). Times are medians of
``triton.testing.do_bench`` on random inputs; peak memory is ``max_memory_allocated`` above what
was allocated before the call. fla's chunk backward refuses Triton < 3.7.1 on Hopper, so only
forward and decode are compared.
"""
from __future__ import annotations

import gc
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

from momtune.errors import InputError

IMPLS = ("momtune", "fla", "reference")
KINDS = ("layer_prefill", "layer_decode", "model_decode")


def _median_ms(fn: Callable[[], Any], warmup: int = 10, rep: int = 50) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


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

    kw = layer_kwargs(cfg)
    if impl == "momtune":
        layer = momtune.MoMAttention(**kw, backend="triton")
    elif impl == "reference":
        layer = momtune.reference.MoMAttention(**kw)
    elif impl == "fla":
        from fla.layers import MomAttention as FlaMom

        layer = FlaMom(**kw)
    else:
        raise InputError(f"impl: {impl!r} is not accepted; use one of {', '.join(IMPLS)}")
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
        raise InputError(f"impl: {impl!r} is not accepted; use one of {', '.join(IMPLS)}")
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
    x = torch.randn(B, T, cfg.hidden_size, device="cuda", dtype=dtype)
    rows, outs = [], {}
    for impl in impls:
        try:
            layer = make_layer(impl, cfg, dtype, state)
            fn = lambda: layer(x)  # noqa: E731
            outs[impl] = fn()[0].float()
            rep = 5 if impl == "reference" else 50
            ms = _median_ms(fn, warmup=2 if impl == "reference" else 10, rep=rep)
            rows.append(_row("layer_prefill", preset, dict(B=B, T=T), dtype, impl, ms=ms,
                             tokens_per_s=B * T / ms * 1e3, peak_mem_mb=_peak_mb(fn)))
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


@torch.no_grad()
def bench_layer_decode(preset: str, B: int, impls: Iterable[str], dtype: torch.dtype, prompt: int = 16) -> list[dict]:
    """One layer's decode step (one token per sequence) after a prompt of ``prompt`` tokens."""
    from momtune.reference.cache import MoMCache
    from momtune.reference.config import MoMConfig

    cfg = MoMConfig.from_preset(preset)
    torch.manual_seed(0)
    state = make_layer("reference", cfg, torch.float32, None).state_dict()
    x = torch.randn(B, prompt + 1, cfg.hidden_size, device="cuda", dtype=dtype)
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
            ms = _median_ms(step, warmup=3, rep=20 if impl != "momtune" else 100)
            extra: dict[str, Any] = {}
            if impl == "momtune":
                extra["graph_ms"] = _graph_ms(step)
            rows.append(_row("layer_decode", preset, dict(B=B), dtype, impl, ms=ms,
                             tokens_per_s=B / ms * 1e3, peak_mem_mb=_peak_mb(step), **extra))
        except Exception as exc:
            rows.append(_row("layer_decode", preset, dict(B=B), dtype, impl, note=f"failed: {exc!s:.200}"))
        finally:
            layer = cache = None
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def _graph_ms(step: Callable[[], Any]) -> float:
    """Per-call time of ``step`` captured in a CUDA graph (10 calls per replay)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            step()
    return _median_ms(g.replay, warmup=5, rep=50) / 10


@torch.no_grad()
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
    ids = torch.randint(0, cfg.vocab_size, (B, prompt + 1), device="cuda")
    for impl in impls:
        model = cache = None
        try:
            model = make_model(impl, cfg, dtype, state)
            if state is None:
                state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
            if impl == "fla":
                cache = model(ids[:, :prompt], use_cache=True).past_key_values
                step = lambda: model(ids[:, prompt:], past_key_values=cache, use_cache=True)  # noqa: E731
            else:
                cache = MoMCache()
                model(ids[:, :prompt], past_key_values=cache)
                if impl == "momtune":
                    graph = DecodeGraph(model, cache, B, ids.dtype)
                    step = lambda: graph.step(ids[:, prompt:])  # noqa: E731
                else:
                    step = lambda: model(ids[:, prompt:], past_key_values=cache)  # noqa: E731
            ms = _median_ms(step, warmup=2, rep=10 if impl != "momtune" else 50)
            rows.append(_row("model_decode", preset, dict(B=B, layers=cfg.num_hidden_layers), dtype, impl, ms=ms,
                             tokens_per_s=B / ms * 1e3, peak_mem_mb=_peak_mb(step)))
        except Exception as exc:
            rows.append(_row("model_decode", preset, dict(B=B, layers=cfg.num_hidden_layers), dtype, impl,
                             note=f"failed: {exc!s:.200}"))
        finally:
            model = cache = step = graph = None
            gc.collect()
            torch.cuda.empty_cache()
    return rows
