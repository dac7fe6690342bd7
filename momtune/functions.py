"""Autograd functions over momtune's kernels with backward kernels (issue 14): the LM's norms and
SwiGLU activation train on Triton (the attention's kernels are still forward-only: under
autograd the attention runs the reference, see :func:`momtune.model.resolve_backend`).

    add_rms_norm_train(x, weight, residual=None, eps) -> (y, h)    norm / norm_bwd templates
    swiglu_train(g, u) -> y                                         swiglu / swiglu_bwd templates
    rms_norm_op, swiglu_op     the kernel call the fast modules make: through the functions above
                               while autograd records, the plain forward kernel otherwise

Saved for backward: the norm's h (its input after the residual add; rstd and the normalised row
are recomputed) and the weight; SwiGLU's g and u (silu(g) is recomputed). Configs come from the
tuned library through ``configs`` (template name -> config), as the forward's.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


class _AddRMSNorm(torch.autograd.Function):
    """y (and h = x + residual, the residual stream, when there is a residual) from the norm
    kernel; x itself is saved when there is none (no copy)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                cfg: Mapping[str, Any] | None, cfg_bwd: Mapping[str, Any] | None) -> Any:
        from momtune.kernels.norm import add_rms_norm

        y, h = add_rms_norm(x, weight, residual=residual, eps=eps, config=cfg)
        ctx.save_for_backward(h, weight)
        ctx.eps, ctx.cfg_bwd, ctx.has_residual = eps, cfg_bwd, residual is not None
        ctx.set_materialize_grads(False)
        return (y, h) if residual is not None else y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None, dh_out: torch.Tensor | None = None) -> tuple[Any, ...]:
        from momtune.kernels.norm.backward import rms_norm_backward

        h, weight = ctx.saved_tensors
        if dy is None:  # only h was used downstream: y's branch contributes nothing
            return dh_out, dh_out, torch.zeros_like(weight), None, None, None
        dh, dw = rms_norm_backward(h, weight, _lastdim_contiguous(dy),
                                   dh_out=None if dh_out is None else _lastdim_contiguous(dh_out),
                                   eps=ctx.eps, config=ctx.cfg_bwd)
        return dh, (dh if ctx.has_residual else None), dw, None, None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, u: torch.Tensor, cfg: Mapping[str, Any] | None,
                cfg_bwd: Mapping[str, Any] | None) -> torch.Tensor:
        from momtune.kernels.swiglu import swiglu

        ctx.save_for_backward(g, u)
        ctx.cfg_bwd = cfg_bwd
        return swiglu(g, u, config=cfg)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        from momtune.kernels.swiglu.backward import swiglu_backward

        g, u = ctx.saved_tensors
        dg, du = swiglu_backward(_lastdim_contiguous(g), _lastdim_contiguous(u), _lastdim_contiguous(dy),
                                 config=ctx.cfg_bwd)
        return dg, du, None, None


def add_rms_norm_train(x: torch.Tensor, weight: torch.Tensor, *, residual: torch.Tensor | None = None,
                       eps: float = 1e-6, config: Mapping[str, Any] | None = None,
                       backward_config: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`momtune.kernels.norm.add_rms_norm` with gradients for x, the residual and the weight
    (the ``norm_bwd`` kernel): x, residual [N, D], weight [D] -> (y, h) [N, D]; without a residual
    h is x itself (as the forward kernel's)."""
    out = _AddRMSNorm.apply(x, residual, weight, eps, config, backward_config)
    return out if residual is not None else (out, x)


def swiglu_train(g: torch.Tensor, u: torch.Tensor, *, config: Mapping[str, Any] | None = None,
                 backward_config: Mapping[str, Any] | None = None) -> torch.Tensor:
    """:func:`momtune.kernels.swiglu.swiglu` with gradients for g and u (the ``swiglu_bwd`` kernel)."""
    return _SwiGLU.apply(g, u, config, backward_config)


def _recording(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rms_norm_op(configs: dict, x2: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) of the ``norm`` kernel on x2 [N, D] (configs looked up once in ``configs``, a
    module's own dict); through :func:`add_rms_norm_train` (``norm_bwd`` for the gradients) while
    autograd records."""
    from momtune.kernels.norm import add_rms_norm
    from momtune.model import cached_config

    N, D = x2.shape
    shape = dict(N=N, D=D, residual=int(residual is not None))
    cfg = cached_config(configs, "norm", shape, x2.dtype)
    if _recording(x2, weight, residual):
        return add_rms_norm_train(x2, weight, residual=residual, eps=eps, config=cfg,
                                  backward_config=cached_config(configs, "norm_bwd", shape, x2.dtype))
    return add_rms_norm(x2, weight, residual=residual, eps=eps, config=cfg)


def swiglu_op(configs: dict, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u on the ``swiglu`` kernel, g and u [N, I]; through :func:`swiglu_train`
    (``swiglu_bwd``) while autograd records."""
    from momtune.kernels.swiglu import swiglu
    from momtune.model import cached_config

    shape = dict(N=g.shape[0], I=g.shape[1])
    cfg = cached_config(configs, "swiglu", shape, g.dtype)
    if _recording(g, u):
        return swiglu_train(g, u, config=cfg, backward_config=cached_config(configs, "swiglu_bwd", shape, g.dtype))
    return swiglu(g, u, config=cfg)
