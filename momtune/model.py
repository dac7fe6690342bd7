"""The fast MoM layer: the reference layer with a Triton backend (the LM: :mod:`momtune.lm`).

``backend="triton"`` runs the tuned kernels (configs from the tuned library through
:mod:`momtune.dispatch`, cached per shape, never tuned at run time); ``"reference"`` runs the
pure-PyTorch reference; ``"auto"`` (default, or ``MOMTUNE_BACKEND``) picks Triton for CUDA
tensors and the reference elsewhere (and says so once). With ``TRITON_INTERPRET=1`` the Triton
backend also runs on CPU tensors (that is how CI tests it), in float32 and float16: the
interpreter's bfloat16 dots are wrong, so there bfloat16 is an error under ``"triton"`` and runs
the reference under ``"auto"`` (said once).

The fast prefill of one layer, x [B, T, D]:

    one GEMM  x @ [q | g_proj | gate | (k, v, b, a) of every memory]^T        (no loop over memories)
    routing   softmax/top-k/renorm + stable counting sort into segments       (on device, no sync)
    conv      gather + causal conv + SiLU per segment, from the unpermuted projections (q, k, v)
    gate_prep g, beta of every packed row
    recurrence chunked gated delta rule over all segments (routed + shared) in one launch
    merge     weighted sum over the slots + gated RMSNorm, then o_proj

The projection weights are views of the fused weight of that GEMM (as cuDNN RNN's
``flatten_parameters``): changing a weight in place changes the fused weight, and a weight that
stopped being its view (``to()``, a new Parameter, ...) is noticed and the fused weight rebuilt.

A decode step (T = 1 with a cache) is one GEMM, top-k routing (no packed layout) and the decode
kernels that update the routed memories' conv windows and states in place and return the mixed,
normed read-out, then o_proj. Inputs are read through their strides (no copies) and nothing
syncs with the host, so the whole model step is captured in a CUDA graph.

``attention_mask`` (padding, as fla) and ``cu_seqlens`` (packed sequences, run as padded rows)
are accepted; padded tokens join no memory and output zeros.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from momtune import settings
from momtune.checks import check_choice
from momtune.errors import InputError, KernelError
from momtune.functions import _recording
from momtune.reference import layer as ref_layer
from momtune.reference.cache import LayerCache, MoMCache

BACKENDS = settings.BACKENDS
ALIGN = 16  # columns: 32 bytes in bf16/fp16, 64 in fp32
INTERPRETER_WRONG_DTYPES = frozenset({torch.bfloat16})  # Triton's interpreter computes tl.dot on these wrongly
_said: set[str] = set()


def _say_once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        warnings.warn(message, stacklevel=3)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def cached_config(store: dict, template: str, shape: dict[str, int], dtype: torch.dtype) -> dict:
    """The dispatched config of ``template`` for ``shape``, looked up once per key in ``store``
    (a module's own dict): nothing tunes at run time and a hot call does one dict lookup."""
    key = (template, tuple(shape.items()), dtype)
    cfg = store.get(key)
    if cfg is None:
        from momtune.dispatch import get_dispatcher
        from momtune.kernels import get_template

        cfg, _source = get_dispatcher().config(get_template(template), shape, dtype)
        store[key] = cfg = dict(cfg)
    return cfg


def run_fitting(store: dict, template: str, shape: dict[str, int], dtype: torch.dtype,
                fn: Callable[[dict], Any]) -> Any:
    """``fn(config)`` with the dispatched config of ``template``; if that launch needs more of
    the GPU than it has per block (shared memory: a config tuned on an H100 on a 99 KiB GPU),
    the template's fallbacks in order. The first that runs is kept for this shape (said once)."""
    from momtune.validate import first_line, is_kernel_resource_error

    cfg = cached_config(store, template, shape, dtype)
    try:
        return fn(cfg)
    except Exception as exc:  # noqa: BLE001 - only resource errors are handled, the rest re-raised
        if not is_kernel_resource_error(exc):
            raise
        why = first_line(exc)
    from momtune.kernels import get_template

    tmpl = get_template(template)
    for fallback in tmpl.fallbacks:
        cand = {**tmpl.default_for(dtype), **fallback}
        if cand == cfg:
            continue
        try:
            out = fn(cand)
        except Exception as exc:  # noqa: BLE001
            if not is_kernel_resource_error(exc):
                raise
            continue
        store[(template, tuple(shape.items()), dtype)] = cand
        _say_once(f"fallback-{template}", f"momtune: the {template} config {cfg} does not fit this GPU ({why}); "
                                          f"running the template's fallback {cand}")
        return out
    raise KernelError(f"{template}: the config {cfg} does not fit this GPU ({why}) and neither does any fallback "
                      f"{list(tmpl.fallbacks)}")


def resolve_backend(backend: str, x: torch.Tensor, module: torch.nn.Module | None = None,
                    backward: bool = False) -> str:
    """'auto' -> 'triton' on CUDA tensors (or in the interpreter), else 'reference'. A call whose
    kernels have no backward (the attention with a cache):
    while autograd records for ``module``'s parameters, 'auto' runs the reference (and says so
    once) and 'triton' is an error rather than silently lost gradients. ``backward``: this call's
    kernels have backward kernels (the norms and SwiGLU, the attention's prefill without a cache:
    :mod:`momtune.functions`), so autograd does not send it to the reference.
    Triton's interpreter computes bfloat16 dots wrongly: there, with bfloat16 ``x`` or weights,
    'auto' runs the reference (said once) and 'triton' is an error rather than garbage."""
    if not backward and module is not None and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        if backend == "auto":
            _say_once("auto-grad", "momtune: autograd is recording, and this call's Triton kernels (the attention "
                                   "with a cache) have no backward yet: backend 'auto' runs the PyTorch reference "
                                   "for it (a prefill without a cache, masked or packed too, trains on the kernels; "
                                   "use torch.no_grad() or torch.inference_mode() for the fast path)")
            return "reference"
        if backend == "triton":
            raise InputError("backend: 'triton' has no backward kernels for this call (the attention with a "
                             "cache), but autograd is recording gradients for this module's parameters; call it "
                             "under torch.no_grad() or torch.inference_mode(), train without a cache "
                             "(use_cache=False, no past_key_values), or use backend='reference' (or 'auto') to train")
    if backend != "reference" and settings.interpreter_mode():
        wrong = _interpreter_wrong_dtype(x, module)
        if wrong is not None and backend == "auto":
            _say_once("auto-interpreter-dtype",
                      f"momtune: Triton's interpreter (TRITON_INTERPRET=1) computes {wrong} dots wrongly: "
                      f"backend 'auto' runs the PyTorch reference for {wrong} (the interpreter runs float32 and "
                      f"float16; {wrong} kernels need a CUDA GPU)")
            return "reference"
        if wrong is not None:
            raise InputError(f"backend: 'triton' cannot run {wrong} in Triton's interpreter (TRITON_INTERPRET=1), "
                             f"whose {wrong} dots are wrong (it would return garbage); the interpreter accepts "
                             f"float32 and float16, {wrong} needs a CUDA GPU without TRITON_INTERPRET; or use "
                             "backend='reference' (or 'auto')")
    if backend == "auto":
        if x.is_cuda or settings.interpreter_mode():
            return "triton"
        _say_once("auto-cpu", "momtune: backend 'auto' runs the PyTorch reference for CPU tensors "
                              "(Triton kernels need CUDA, or TRITON_INTERPRET=1)")
        return "reference"
    if backend == "triton" and not x.is_cuda and not settings.interpreter_mode():
        raise InputError("backend: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; "
                         "use backend='reference' or 'auto'")
    return backend


def _interpreter_wrong_dtype(x: torch.Tensor, module: torch.nn.Module | None) -> str | None:
    """The name of the dtype of ``x`` or of ``module``'s floating parameters that Triton's
    interpreter computes wrongly (its ``tl.dot`` on bfloat16 returns garbage), or None."""
    dtypes = {x.dtype} | ({p.dtype for p in module.parameters()} if module is not None else set())
    wrong = sorted(str(d).removeprefix("torch.") for d in dtypes & INTERPRETER_WRONG_DTYPES)
    return wrong[0] if wrong else None


class MoMAttention(ref_layer.MoMAttention):
    """fla-compatible MoM layer (same constructor, parameters and outputs as the reference) with
    ``backend="auto"|"triton"|"reference"``."""

    def __init__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        env = settings.load()
        self.backend = check_choice("backend", backend or env.backend, BACKENDS)
        self.checks = env.checks  # MOMTUNE_CHECKS: whether a call checks that its input is finite
        self._configs: dict[tuple, dict] = {}
        # the projection weights become views of one fused weight (see _fused_weight)
        self._fused: torch.Tensor | None = None
        self._fused_views: list[tuple[int, torch.Size]] = []
        self._fused_weight()

    # ---------------------------------------------------------------- weights and configs
    def _layout(self) -> tuple[list[tuple[str, int, int]], int, int]:
        """Column blocks of the fused projection: (name, offset, width) of q, gate, logits, then
        k, v, b, a of one memory slot; the slot stride (0 with ``single_kv_proj``: one k/v/b/a
        block serves every slot); the total width. Every block starts on a multiple of ALIGN
        columns and the total is one too, so rows and block starts are 16-byte aligned in any
        dtype: cuBLAS keeps its aligned (TMA) GEMMs and the kernels reading these strided views
        get Triton's divisibility-by-16 specialisation of pointers and strides (vector loads)."""
        HK, HV, H, E = self.key_dim, self.value_dim, self.num_heads, self.num_memories
        blocks, off = [], 0
        for name, width in (("q", HK), ("gate", HV), ("logits", E)):
            blocks.append((name, off, width))
            off += _align(width)
        slot0 = off
        for name, width in (("k", HK), ("v", HV), ("b", H), ("a", H)):
            blocks.append((name, off - slot0, width))
            off += _align(width)
        slot_w = off - slot0
        n_blocks = 1 if self.single_kv_proj else self.num_slots
        return blocks, (0 if self.single_kv_proj else slot_w), slot0 + n_blocks * slot_w

    def _projection_weights(self) -> list[torch.Tensor]:
        """The weights of the fused projection in :meth:`_layout` order: q_proj, g_proj, gate (the
        router), then k, v, b, a of each memory slot (one set with ``single_kv_proj``)."""
        lins = [self.q_proj, self.g_proj, self.gate]
        if not self.single_kv_proj:  # memory_linears(m) of every slot, without its per-call cost
            for per_memory in zip(self.k_proj, self.v_proj, self.b_proj, self.a_proj, strict=True):
                lins += per_memory
        if self.single_kv_proj or self.shared_mem:
            lins += [self.shared_k, self.shared_v, self.shared_b, self.shared_a]
        # the registered Parameter (or the tensor functional_call put there) without Module.__getattr__;
        # a computed weight (a parametrization) through the attribute
        return [lin._parameters.get("weight") if "weight" in lin._parameters else lin.weight for lin in lins]

    def _projection_rows(self) -> tuple[list[int], int]:
        """The first row of each weight of :meth:`_projection_weights` in the fused weight, and
        its total rows (the GEMM output's columns of :meth:`_layout`)."""
        blocks, slot_stride, total = self._layout()
        slot0 = blocks[2][1] + _align(blocks[2][2])
        rows = [off for _, off, _ in blocks[:3]]
        for m in range(1 if self.single_kv_proj else self.num_slots):
            rows += [slot0 + m * slot_stride + off for _, off, _ in blocks[3:]]
        return rows, total

    def _fused_weight(self) -> torch.Tensor:
        """The fused projection weight [rows, D]: [q | g_proj | gate | per memory slot (k, v, b, a)]
        in the aligned layout of :meth:`_layout`, padding rows zero.

        The projection weights are views of it (as cuDNN RNN's ``flatten_parameters``), so an
        in-place change of a weight (``.data.mul_``, ``copy_``, ``load_state_dict``, an optimizer
        step) is a change of this buffer and nothing goes stale, with no copy per call. A weight
        that is no longer its view at its row (``to()``/``half()``/``cuda()``, a new Parameter,
        ``load_state_dict(assign=True)``, ``.data = ...``, a parametrization) is noticed by its
        address, and the buffer is rebuilt from the weights (every call, if it never stays a view)."""
        weights = self._projection_weights()
        fused = self._fused
        if fused is not None:
            base = fused.data_ptr()
            if all(w.data_ptr() - base == off and w.shape == shape
                   for w, (off, shape) in zip(weights, self._fused_views, strict=True)):
                return fused
        return self._flatten(weights)

    def _flatten(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """A new fused weight holding ``weights``' values; each weight that is a Parameter then
        points its ``.data`` at its rows (its identity, ``requires_grad`` and grad are kept).
        During a CUDA graph capture the weights are left as they are (a copy for that graph)."""
        w0 = weights[0]
        odd = [i for i, w in enumerate(weights) if (w.dtype, w.device) != (w0.dtype, w0.device)]
        if odd:
            names = [n for n, _ in self._projection_names()]
            raise InputError("parameters: the projection weights must share one dtype and device; "
                             f"{names[0]} is {w0.dtype} on {w0.device}, but "
                             + ", ".join(f"{names[i]} is {weights[i].dtype} on {weights[i].device}" for i in odd)
                             + "; convert the layer with .to()")
        rows, total = self._projection_rows()
        # never an inference tensor (a buffer first built under inference_mode would break training later)
        with torch.inference_mode(False), torch.no_grad():
            fused = torch.zeros(total, w0.shape[1], dtype=w0.dtype, device=w0.device)
            for w, r in zip(weights, rows):
                fused[r:r + w.shape[0]].copy_(w)
        if fused.is_cuda and torch.cuda.is_current_stream_capturing():
            return fused  # parameters never point into a graph's private memory pool
        views = []
        for w, r in zip(weights, rows):
            view = fused[r:r + w.shape[0]]
            if isinstance(w, torch.nn.Parameter):
                w.data = view
            views.append((view.data_ptr() - fused.data_ptr(), view.shape))
        self._fused, self._fused_views = fused, views
        return fused

    def _projection_names(self) -> list[tuple[str, torch.Tensor]]:
        """(state_dict name, weight) of :meth:`_projection_weights`, in that order."""
        names = ["q_proj", "g_proj", "gate"]
        for m in range(1 if self.single_kv_proj else self.num_slots):
            shared = self.single_kv_proj or m == self.num_memories
            names += [f"shared_{p}" if shared else f"{p}_proj.{m}" for p in "kvba"]
        return [(f"{n}.weight", w) for n, w in zip(names, self._projection_weights(), strict=True)]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MoMAttention:
        """``to()``, ``cuda()``, ``half()``, ... give the weights new tensors: the fused weight is
        rebuilt on the new device/dtype right away (the old one is freed, not kept until a call)."""
        out = super()._apply(fn, recurse)
        if len({(w.dtype, w.device) for w in self._projection_weights()}) == 1:  # else: an error at the call
            self._fused_weight()
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (torch.load of a module): views of the fused weight stay views; a module
        pickled before the fused weight existed gets one at its first Triton call."""
        state.pop("_packed", None)
        super().__setstate__({"_fused": None, "_fused_views": [], **state})

    @classmethod
    def wrap(cls, ref: ref_layer.MoMAttention, backend: str | None = None) -> MoMAttention:
        """A fast layer with ``ref``'s hyper-parameters and a copy of its weights."""
        fast = cls(hidden_size=ref.hidden_size, head_dim=ref.head_dim, num_heads=ref.num_heads,
                   expand_v=ref.expand_v, mode=ref.mode, conv_size=ref.conv_size, layer_idx=ref.layer_idx,
                   norm_eps=ref.norm_eps, num_memories=ref.num_memories, topk=ref.topk,
                   shared_mem=ref.shared_mem, single_kv_proj=ref.single_kv_proj, backend=backend)
        fast.load_state_dict(ref.state_dict())
        return fast.to(device=ref.q_proj.weight.device, dtype=ref.q_proj.weight.dtype)

    def _config(self, template: str, shape: dict[str, int], dtype: torch.dtype) -> dict:
        return cached_config(self._configs, template, shape, dtype)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MoMCache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, MoMCache | None]:
        if "cu_seqlens" in kwargs:
            trainable = past_key_values is None and not use_cache  # packed training: see _prefill_train
            if (attention_mask is None
                    and resolve_backend(self.backend, hidden_states, self, backward=trainable) == "triton"):
                return self._forward_packed(hidden_states, past_key_values, use_cache, kwargs)
            return self._forward_varlen(hidden_states, attention_mask, past_key_values, use_cache, kwargs)
        # a training prefill (no cache) has its backward on the kernels: see _prefill_train
        trainable = past_key_values is None and not use_cache
        backend = resolve_backend(self.backend, hidden_states, self, backward=trainable)
        if backend == "reference":
            return super().forward(hidden_states, attention_mask, past_key_values, use_cache, output_attentions, **kwargs)
        capturing = hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing:  # no host-synchronising checks inside a CUDA graph capture
            x = hidden_states
        else:
            x = self._check_inputs(hidden_states, attention_mask, past_key_values, kwargs,
                                   values=self._check_values(hidden_states))
        if self.mode != "chunk" and not capturing:
            _say_once("mode", "momtune: mode='fused_recurrent' computes the same function; the Triton "
                              "backend always runs its chunked kernel")
        cache = MoMCache() if past_key_values is None and use_cache else past_key_values
        entry = self._cache_entry(cache, x) if cache is not None else None
        valid = self._valid_tokens(attention_mask, x)
        if entry is not None and x.shape[1] == 1:
            out, logits = self._decode(x, entry, valid)
        elif trainable and _recording(x, *self.parameters()):
            out, logits = self._prefill_train(x, valid=valid)
        else:
            out, logits = self._prefill(x, entry, valid)
        if entry is not None:
            entry.seen_tokens += x.shape[1]
        return out, logits, cache

    def _check_values(self, x: torch.Tensor) -> bool:
        """Whether to check that the input is finite: it reads the input and syncs with the host,
        so on CUDA (checks "auto") only metadata is checked and the CPU keeps launching ahead."""
        return self.checks == "full" or (self.checks == "auto" and not x.is_cuda)

    def _forward_packed(self, x: torch.Tensor, past_key_values: MoMCache | None, use_cache: bool,
                        kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, MoMCache | None]:
        """Packed sequences on the kernels without padding: x [1, N, D], cu_seqlens [S+1]; each
        sequence is a routing row of its own (its own segments and cache row). Reads cu_seqlens
        on the host (lengths). A step of one token per sequence with a cache is a decode step."""
        cu, max_len, kwargs = self._packed_input(x, None, kwargs)
        x = self._check_inputs(x, None, past_key_values, kwargs, values=self._check_values(x))
        N, D = x.shape[1], x.shape[2]
        S = cu.numel() - 1
        cache = MoMCache() if past_key_values is None and use_cache else past_key_values
        if cache is not None and N == S and max_len == 1:  # one token per sequence: a decode step
            out, logits, _ = self.forward(x.view(S, 1, D), None, cache)
            return out.view(1, S, D), logits, cache
        entry = None if cache is None else self._cache_entry(cache, x, batch_size=S)
        seq = (cu.to(x.device, torch.int32), max_len, S)
        if entry is None and _recording(x, *self.parameters()):
            out, logits = self._prefill_train(x, seq)
        else:
            out, logits = self._prefill(x, entry, None, seq=seq)
        if entry is not None:
            entry.seen_tokens += max_len
        return out, logits, cache

    def _cache_entry(self, cache: MoMCache, x: torch.Tensor, batch_size: int | None = None) -> LayerCache:
        from momtune.reference.recurrence import compute_dtype

        return cache.get_or_create(
            self._cache_key, batch_size=x.shape[0] if batch_size is None else batch_size,
            num_slots=self.num_slots, num_heads=self.num_heads,
            head_k=self.head_dim, head_v=self.head_v_dim, conv_size=self.conv_size,
            state_dtype=compute_dtype(x.dtype), window_dtype=x.dtype, device=x.device)

    def _project(self, x2: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """x2 [N, D] -> strided views q [N, HK], gate [N, HV], logits [N, E], k/v/b/a [N, M, *]
        into one aligned GEMM output (with ``single_kv_proj`` the slot axis has stride 0), by
        slicing and view ops (autograd follows them). ``weight``: the fused weight to use
        (default :meth:`_fused_weight`; a training step passes :meth:`_fused_weight_train`'s)."""
        from momtune.functions import _Blocks

        blocks, slot_stride, total = self._layout()
        N, M = x2.shape[0], self.num_slots
        proj = F.linear(x2, self._fused_weight() if weight is None else weight)
        (_, oq, wq), (_, og, wg), (_, ol, wl) = blocks[:3]
        slot0 = blocks[2][1] + _align(wl)

        def views(p: torch.Tensor) -> tuple[torch.Tensor, ...]:
            q, gate, logits = p[:, oq:oq + wq], p[:, og:og + wg], p[:, ol:ol + wl]
            if slot_stride:
                slots = p[:, slot0:slot0 + M * slot_stride].view(N, M, slot_stride)
                k, v, b, a = (slots[:, :, off:off + width] for _, off, width in blocks[3:])
            else:  # one k/v/b/a block read by every slot
                k, v, b, a = (p[:, None, slot0 + off:slot0 + off + width].expand(N, M, width)
                              for _, off, width in blocks[3:])
            return q, gate, logits, k, v, b, a

        # while autograd records: one backward writes every block's gradient into one buffer
        return _Blocks.apply(proj, views) if proj.requires_grad else views(proj)

    def _fused_weight_train(self) -> torch.Tensor:
        """The fused weight of :meth:`_fused_weight`'s layout built from the parameters by a
        differentiable concatenation (zero rows between blocks): the inference buffer is not in
        autograd's graph, this is."""
        rows, total = self._projection_rows()
        weights = self._projection_weights()
        D = weights[0].shape[1]
        pieces, at = [], 0
        for w, r in zip(weights, rows):
            if r > at:
                pieces.append(w.new_zeros(r - at, D))
            pieces.append(w)
            at = r + w.shape[0]
        if total > at:
            pieces.append(weights[0].new_zeros(total - at, D))
        return torch.cat(pieces)

    def _prefill(self, x: torch.Tensor, entry: LayerCache | None, valid: torch.Tensor | None = None,
                 seq: tuple[torch.Tensor, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D]; ``seq`` = (cu_seqlens int32 [S+1], max length, S) when x [1, N, D] holds
        S packed sequences (the routing rows, segments and cache rows are then the sequences)."""
        from momtune.kernels.conv.conv import gate_prep, segment_conv
        from momtune.kernels.merge.merge import merge_prefill
        from momtune.kernels.recurrence.chunk import chunk_recurrence
        from momtune.kernels.routing.routing import route_and_group

        B, T, D = x.shape
        E, M, H, K, V, W = self.num_memories, self.num_slots, self.num_heads, self.head_dim, self.head_v_dim, self.conv_size
        J, dt, sh = self.topk + int(self.shared_mem), x.dtype, int(self.shared_mem)
        q_in, gate, logits, k_in, v_in, b_in, a_in = self._project(x.reshape(B * T, D))
        logits = logits.contiguous()  # a copy: a view would keep the whole projection alive
        R = B if seq is None else seq[2]  # routing rows: batch rows or packed sequences
        r = route_and_group(logits.view(B, T, E), self.topk, shared=self.shared_mem, valid=valid,
                            seq_offsets=None if seq is None else seq[0], max_len=None if seq is None else seq[1],
                            config=self._config("routing", dict(B=B, T=T, E=E, topk=self.topk, shared=sh, D=D), dt))
        Np = B * T * J
        idx = (r.token_index, r.row_mem, r.row_seg, r.cu_seqlens)

        def conv(src: torch.Tensor, weight: torch.Tensor, cached: torch.Tensor | None) -> torch.Tensor:
            C = weight.shape[0]
            cfg = self._config("conv", dict(B=B, T=T, E=E, topk=self.topk, shared=sh, C=C), dt)
            init = None if cached is None else cached.view(R * M, W - 1, C)
            final = None if cached is None else torch.empty_like(init)
            y = segment_conv(src, weight.view(C, W), *idx, initial_window=init, final_window=final, config=cfg)
            if cached is not None:
                cached.copy_(final.view_as(cached))
            return y

        q = conv(q_in, self.q_conv1d.weight, None if entry is None else entry.conv_q)
        k = conv(k_in, self.k_conv1d.weight, None if entry is None else entry.conv_k)
        v = conv(v_in, self.v_conv1d.weight, None if entry is None else entry.conv_v)
        g, beta = gate_prep(a_in, b_in, r.token_index, r.row_mem, self.A_log, self.dt_bias)
        state = None if entry is None else entry.state.view(R * M, H, K, V)
        # with padding, its rows (after the segments) are never written: zeros, read with weight 0
        o_buf = None if valid is None else torch.zeros(Np, H, V, dtype=dt, device=x.device)
        o, final = run_fitting(
            self._configs, "recurrence", dict(N=Np, S=R * M, H=H, K=K, V=V), dt,
            lambda cfg: chunk_recurrence(q.view(Np, H, K), k.view(Np, H, K), v.view(Np, H, V), g, beta,
                                         r.cu_seqlens, rule="gated_delta", initial_state=state,
                                         output_final_state=entry is not None, use_qk_l2norm=True, config=cfg,
                                         out=o_buf))
        if entry is not None:
            entry.state.copy_(final.view_as(entry.state))
        cfg = self._config("merge", dict(B=B, T=T, H=H, V=V, J=J, fused_norm=1), dt)
        y = merge_prefill(o, r.slot, r.weights, gate=gate, norm_weight=self.o_norm.weight, eps=self.norm_eps, config=cfg)
        return F.linear(y.reshape(B, T, H * V), self.o_proj.weight), logits.view(B * T, E)

    def _prefill_train(self, x: torch.Tensor, seq: tuple[torch.Tensor, int, int] | None = None,
                       valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill of a training step (autograd records; no cache; ``seq`` for packed
        sequences and ``valid`` for a padding mask as in :meth:`_prefill`): the kernels of
        :meth:`_prefill` through :mod:`momtune.functions`' autograd functions, their gradients from
        the backward templates (the recurrence's from its chunk backward in PyTorch,
        :func:`momtune.reference.recurrence.gated_delta_backward`). The fused projection weight is
        built from the parameters by a differentiable concatenation (the inference buffer is not
        in the graph)."""
        from momtune import functions as fn
        from momtune.kernels.recurrence.chunk import chunk_recurrence

        B, T, D = x.shape
        E, M, H, K, V, W = self.num_memories, self.num_slots, self.num_heads, self.head_dim, self.head_v_dim, self.conv_size
        J, dt, sh = self.topk + int(self.shared_mem), x.dtype, int(self.shared_mem)
        N, Np = B * T, B * T * J
        q_in, gate, logits, k_in, v_in, b_in, a_in = self._project(x.reshape(N, D), self._fused_weight_train())
        rshape = dict(B=B, T=T, E=E, topk=self.topk, shared=sh, D=D)
        R = B if seq is None else seq[2]  # routing rows: batch rows or packed sequences
        weights_r, _, cu, slot, tok, mem, seg = fn._Route.apply(
            logits.contiguous().view(B, T, E), self.topk, self.shared_mem, self._config("routing", rshape, dt),
            self._config("routing_bwd", rshape, dt), None if seq is None else seq[0], None if seq is None else seq[1],
            valid)
        layout = (tok, mem, seg, cu)

        def conv(src: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            C = weight.shape[0]
            cshape = dict(B=B, T=T, E=E, topk=self.topk, shared=sh, C=C)
            return fn._SegmentConv.apply(src, weight.view(C, W), *layout, self._config("conv", cshape, dt),
                                         self._config("conv_bwd", cshape, dt))

        q = conv(q_in, self.q_conv1d.weight)
        k = conv(k_in, self.k_conv1d.weight)
        v = conv(v_in, self.v_conv1d.weight)
        g, beta = fn._GatePrep.apply(a_in, b_in, tok, mem, self.A_log, self.dt_bias)

        # with padding, its rows (after the segments) are never written: zeros, read with weight 0
        o_buf = None if valid is None else torch.zeros(Np, H, V, dtype=dt, device=x.device)

        rec_shape = dict(N=Np, S=R * M, H=H, K=K, V=V)

        def run(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, gg: torch.Tensor, bb: torch.Tensor) -> Any:
            return run_fitting(self._configs, "recurrence", rec_shape, dt,
                               lambda cfg: chunk_recurrence(qq, kk, vv, gg, bb, cu, rule="gated_delta",
                                                            use_qk_l2norm=True, config=cfg, out=o_buf))

        o = fn._Recurrence.apply(q.view(Np, H, K), k.view(Np, H, K), v.view(Np, H, V), g, beta, cu, run,
                                 self._config("recurrence_bwd", rec_shape, dt))
        mshape = dict(B=B, T=T, H=H, V=V, J=J, fused_norm=1)
        y = fn._Merge.apply(o, slot, weights_r, gate, self.o_norm.weight, self.norm_eps,
                            self._config("merge", mshape, dt), self._config("merge_bwd", mshape, dt))
        return F.linear(y.reshape(B, T, H * V), self.o_proj.weight), logits

    def _decode(self, x: torch.Tensor, entry: LayerCache,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from momtune.kernels.decode.step import decode_step
        from momtune.kernels.routing.routing import route_topk

        B, _, D = x.shape
        E, H, K, V, W = self.num_memories, self.num_heads, self.head_dim, self.head_v_dim, self.conv_size
        J, dt, sh = self.topk + int(self.shared_mem), x.dtype, int(self.shared_mem)
        # routing reads the logits through their strides, and the decode-sized projection is small
        # enough to stay alive with the returned logits view: no copy launch
        q_in, gate, logits, k_in, v_in, b_in, a_in = self._project(x.reshape(B, D))
        weights, idx = route_topk(logits.view(B, 1, E), self.topk, shared=self.shared_mem, valid=valid,
                                  config=self._config("routing", dict(B=B, T=1, E=E, topk=self.topk, shared=sh, D=D), dt))
        cfg = self._config("decode", dict(B=B, H=H, K=K, V=V, E=E, topk=self.topk, shared=sh), dt)
        y = decode_step(q_in, k_in, v_in, a_in, b_in, idx.view(B, J), weights.view(B, J), entry.state,
                        entry.conv_q, entry.conv_k, entry.conv_v, self.q_conv1d.weight.view(-1, W),
                        self.k_conv1d.weight.view(-1, W), self.v_conv1d.weight.view(-1, W), self.A_log,
                        self.dt_bias, rule="gated_delta", gate=gate, norm_weight=self.o_norm.weight,
                        eps=self.norm_eps, config=cfg)
        return F.linear(y.reshape(B, 1, H * V), self.o_proj.weight), logits.view(B, E)
