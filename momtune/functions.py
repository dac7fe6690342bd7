"""Autograd functions over momtune's kernels with backward kernels (issue 14): the LM's norms and
SwiGLU activation train on Triton, and so does the attention's prefill (routing, convs, gates,
merge on their backward kernels; the recurrence's backward, written out by hand in
:class:`_Recurrence`, on the chunk backward kernels), see ``MoMAttention._prefill_train``.

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


class _Blocks(torch.autograd.Function):
    """Strided views of one 2-D tensor (the fused projection's column blocks, ``views(x)``: each
    a [rows, width] or [rows, slots, width] view whose rows are x's rows and whose last stride is
    1; a slot axis of stride 0 is an expanded block) whose backward writes every view's gradient
    into one buffer of x's shape, the columns no view covers zeroed. Autograd's own slice
    backward makes a zeroed copy of all of x per view and adds the copies up: at mom-340m B 8
    T 2048 (x [16384, 12464] bf16) 8 fills and 6 adds of 400 MB buffers, ~2.5 ms of a 23 ms
    training step on the H200 (session 12's profile)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, views: Any) -> tuple[torch.Tensor, ...]:
        out = tuple(views(x))
        rows, cols = x.shape
        geom, spans = [], []
        for v in out:
            size, stride, off = tuple(v.shape), tuple(v.stride()), v.storage_offset() - x.storage_offset()
            if not (x.is_contiguous() and size[0] == rows and stride[0] == cols and stride[-1] == 1
                    and v.dim() in (2, 3) and 0 <= off < cols):
                raise ValueError(f"_Blocks: a view {size} / {stride} at {off} is not a column block of {tuple(x.shape)}")
            geom.append((size, stride, off))
            reps = [0] if v.dim() == 2 or stride[1] == 0 else [m * stride[1] for m in range(size[1])]
            spans += [(off + r, off + r + size[-1]) for r in reps]
        gaps, at = [], 0
        for a, b in sorted(spans):
            if a > at:
                gaps.append((at, a))
            at = max(at, b)
        if at < cols:
            gaps.append((at, cols))
        ctx.geom, ctx.gaps, ctx.meta = geom, gaps, (x.shape, x.dtype, x.device)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        shape, dtype, device = ctx.meta
        dx = torch.empty(shape, dtype=dtype, device=device)
        for (size, stride, off), g in zip(ctx.geom, grads):
            keep = [d for d in range(len(size)) if stride[d] != 0]  # an expanded slot axis: its sum
            region = dx.as_strided([size[d] for d in keep], [stride[d] for d in keep], dx.storage_offset() + off)
            if g is None:
                region.zero_()
            else:
                region.copy_(g.sum([d for d in range(len(size)) if d not in keep]) if len(keep) < len(size) else g)
        for a, b in ctx.gaps:
            dx[:, a:b].zero_()
        return dx, None


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
    """Autograd records a graph through any of ``tensors``."""
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


# ------------------------------------------------------------------------------------------------
# The attention's pieces (issue 14): MoMAttention's prefill under autograd, see
# momtune.model.MoMAttention._prefill_train. Saved for backward: the routing's weights and layout
# (int32 maps), each conv's source view and weight (a is recomputed), the recurrence's inputs, the
# merge's packed read-outs, weights and gate.

class _Route(torch.autograd.Function):
    """route_and_group's layout (not differentiable) and its weights, whose gradient reaches the
    router logits through the renormalised top-k softmax (``routing_bwd``)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, topk: int, shared: bool, cfg: Mapping[str, Any] | None,
                cfg_bwd: Mapping[str, Any] | None, seq_offsets: torch.Tensor | None = None,
                max_len: int | None = None, valid: torch.Tensor | None = None) -> Any:
        from momtune.kernels.routing.routing import route_and_group

        r = route_and_group(logits, topk, shared=shared, valid=valid, seq_offsets=seq_offsets, max_len=max_len,
                            config=cfg)
        ctx.save_for_backward(r.weights, r.idx)
        ctx.topk, ctx.E, ctx.dtype, ctx.cfg_bwd = topk, logits.shape[-1], logits.dtype, cfg_bwd
        ctx.mark_non_differentiable(r.idx, r.cu_seqlens, r.slot, r.token_index, r.row_mem, r.row_seg)
        return r.weights, r.idx, r.cu_seqlens, r.slot, r.token_index, r.row_mem, r.row_seg

    @staticmethod
    def backward(ctx: Any, dweights: torch.Tensor | None, *_: Any) -> tuple[Any, ...]:
        from momtune.kernels.routing.backward import route_weights_backward

        if dweights is None:
            return None, None, None, None, None, None, None, None
        weights, idx = ctx.saved_tensors  # a padded token: idx -1, no gradient to its logits
        dl = route_weights_backward(weights, idx, dweights.contiguous(), ctx.topk, ctx.E, dtype=ctx.dtype,
                                    config=ctx.cfg_bwd)
        return dl, None, None, None, None, None, None, None


class _SegmentConv(torch.autograd.Function):
    """segment_conv without a window (a training prefill) / segment_conv_backward (``conv_bwd``)."""

    @staticmethod
    def forward(ctx: Any, src: torch.Tensor, weight: torch.Tensor, token_index: torch.Tensor, row_mem: torch.Tensor,
                row_seg: torch.Tensor, cu_seqlens: torch.Tensor, cfg: Mapping[str, Any] | None,
                cfg_bwd: Mapping[str, Any] | None) -> torch.Tensor:
        from momtune.kernels.conv.conv import segment_conv

        ctx.save_for_backward(src, weight, token_index, row_mem, row_seg, cu_seqlens)
        ctx.cfg_bwd = cfg_bwd
        return segment_conv(src, weight, token_index, row_mem, row_seg, cu_seqlens, config=cfg)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        from momtune.kernels.conv.backward import segment_conv_backward

        src, weight, *layout = ctx.saved_tensors
        dsrc, dw = segment_conv_backward(src, weight, *layout, dy.contiguous(), config=ctx.cfg_bwd)
        return dsrc, dw, None, None, None, None, None, None


class _GatePrep(torch.autograd.Function):
    """g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b) of every packed row from the
    gather kernel; the backward is autograd of the same fp32 math on the gathered rows (a few
    elementwise ops on [Np, H]: no kernel of its own)."""

    @staticmethod
    def forward(ctx: Any, a_all: torch.Tensor, b_all: torch.Tensor, token_index: torch.Tensor, row_mem: torch.Tensor,
                A_log: torch.Tensor, dt_bias: torch.Tensor) -> Any:
        from momtune.kernels.conv.conv import gate_prep

        ctx.save_for_backward(a_all, b_all, token_index, row_mem, A_log, dt_bias)
        return gate_prep(a_all, b_all, token_index, row_mem, A_log, dt_bias)

    @staticmethod
    def backward(ctx: Any, dg: torch.Tensor | None, dbeta: torch.Tensor | None) -> tuple[Any, ...]:
        import torch.nn.functional as F

        a_all, b_all, tok, mem, A_log, dt_bias = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(True) for t in (a_all, b_all, A_log, dt_bias)]
        with torch.enable_grad():
            tok_l, mem_l = tok.long(), mem.long()
            a = leaves[0][tok_l, mem_l].float()
            b = leaves[1][tok_l, mem_l].float()
            g = -leaves[2].float().exp() * F.softplus(a + leaves[3].float())
            beta = torch.sigmoid(b).to(b_all.dtype)
            outs = [(o, d) for o, d in ((g, dg), (beta, dbeta)) if d is not None]
            got = torch.autograd.grad([o for o, _ in outs], leaves, [d for _, d in outs], allow_unused=True)
        da, db, dA, ddt = (torch.zeros_like(t) if x is None else x for t, x in zip(leaves, got))
        return da, db, None, None, dA, ddt


class _Recurrence(torch.autograd.Function):
    """The chunked recurrence (the Triton kernel, run by ``run``, which writes into ``out`` when
    given: a masked batch's zeroed buffer, whose rows past ``cu_seqlens[-1]`` (the padding tail)
    no segment writes); backward: the chunk backward written out by hand on the saved inputs' rows
    in segments (:func:`momtune.reference.recurrence.recurrence_backward`), on Triton kernels from
    the token layout to the gradients (:mod:`momtune.kernels.recurrence.chunk_bwd`: the chunk-local
    terms, the two sequential scans of :mod:`momtune.kernels.recurrence.scan`, the chunk gradients,
    the q, k normalisation's both ways: the template "recurrence_bwd", whose config ``cfg_bwd``
    is; float64 inputs: all in PyTorch); the tail gets no gradient.

    ``rule``: "gated_delta" (default) or "gated_linear" (beta None; its gradient None).
    ``initial_state`` [S, H, K, V] (None: zeros): the segments' starting states, differentiable;
    ``run`` is then called as ``run(q, k, v, g, beta, initial_state)`` (else without it) and
    returns (o, final_state). ``output_final_state``: the final states [S, H, K, V] (float32, from
    ``run``) are returned after o, differentiable too (their gradient starts the backward's state
    scan); otherwise only o is returned."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                beta: torch.Tensor | None, cu_seqlens: torch.Tensor, run: Any, cfg_bwd: Mapping[str, Any] | None = None,
                rule: str = "gated_delta", initial_state: torch.Tensor | None = None,
                output_final_state: bool = False) -> Any:
        from momtune.checks import check_choice
        from momtune.errors import InputError
        from momtune.reference.recurrence import RULES

        check_choice("rule", rule, RULES)
        if rule == "gated_delta" and beta is None:
            raise InputError("beta: the rule 'gated_delta' needs beta [N, H]; 'gated_linear' takes None")
        ctx.save_for_backward(q, k, v, g, beta if rule == "gated_delta" else None, cu_seqlens, initial_state)
        ctx.cfg_bwd, ctx.rule = cfg_bwd, rule
        ctx.set_materialize_grads(False)
        o, final = run(q, k, v, g, beta) if initial_state is None else run(q, k, v, g, beta, initial_state)
        if not output_final_state:
            return o
        if final is None:
            raise InputError("run: output_final_state needs the final states from run (output_final_state=True "
                             "in its chunk_recurrence call), got None")
        return o, final

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor | None, dfinal: torch.Tensor | None = None) -> tuple[Any, ...]:
        from momtune.kernels.recurrence.chunk import dot_precision
        from momtune.kernels.recurrence.chunk_bwd import TritonBackward
        from momtune.reference.recurrence import recurrence_backward

        q, k, v, g, beta, cu, init = ctx.saved_tensors
        init_dtype = None if init is None else init.dtype
        if do is None:  # only the final states were used
            do = v.new_zeros(v.shape)
        rows = int(cu[-1])  # one host read a training step (the padding tail after the segments)
        triton_path = q.dtype != torch.float64
        scans = TritonBackward(dot=dot_precision(q.dtype), **(ctx.cfg_bwd or {})) if triton_path else None
        if triton_path:  # the kernels take the states in float32 (as the forward kernel keeps them)
            init = None if init is None else init.float()
            dfinal = None if dfinal is None else dfinal.float()
        got = recurrence_backward(*(t[:rows] for t in (q, k, v, g)), None if beta is None else beta[:rows], do[:rows],
                                  cu_seqlens=cu, rule=ctx.rule, use_qk_l2norm=True, scans=scans,
                                  initial_state=init, dfinal=dfinal)
        dq, dk, dv, dg, db, ds0 = got
        if rows < q.shape[0]:
            dq, dk, dv, dg, db = (None if d is None else torch.cat([d, d.new_zeros((q.shape[0] - rows, *d.shape[1:]))])
                                  for d in (dq, dk, dv, dg, db))
        if ds0 is not None:
            ds0 = ds0.to(init_dtype)
        return dq, dk, dv, dg, db, None, None, None, None, ds0, None


class _Merge(torch.autograd.Function):
    """merge_prefill with the fused gated RMSNorm / merge_backward (``merge_bwd``)."""

    @staticmethod
    def forward(ctx: Any, o_packed: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor,
                norm_weight: torch.Tensor, eps: float, cfg: Mapping[str, Any] | None,
                cfg_bwd: Mapping[str, Any] | None) -> torch.Tensor:
        from momtune.kernels.merge.merge import merge_prefill

        ctx.save_for_backward(o_packed, slot, weights, gate, norm_weight)
        ctx.eps, ctx.cfg_bwd = eps, cfg_bwd
        return merge_prefill(o_packed, slot, weights, gate=gate, norm_weight=norm_weight, eps=eps, config=cfg)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        from momtune.kernels.merge.backward import merge_backward

        o_packed, slot, weights, gate, norm_weight = ctx.saved_tensors
        res = merge_backward(o_packed, slot, weights, dy.contiguous(), gate=gate, norm_weight=norm_weight,
                             eps=ctx.eps, config=ctx.cfg_bwd)
        return res["do_packed"], None, res["dweights"], res["dgate"].view(gate.shape), res["dnorm_weight"], None, None, None
