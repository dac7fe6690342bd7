"""The template protocol: what every tunable kernel declares so the engine can tune it.

A template is a parametrised Triton kernel plus everything needed to check and time it:

- ``name``: unique, also the name of its search space ``search_spaces/<name>.toml``;
- ``shape_keys``: the keys of a shape dict (e.g. ``("N", "H", "K", "V", "S")``);
- ``make_inputs(shape, dtype, device, seed)``: fresh random inputs (a dict of tensors and
  scalars) for that shape — never zeros;
- ``launch(inputs, config)``: runs the kernel(s) with a config dict and returns a dict of
  output tensors (allocated inside, so the engine can poison them via ``out=`` if given);
- ``reference(inputs, dtype=torch.float64)``: the reference outputs (same keys), computed by
  ``momtune.reference`` in float64 (in ``dtype`` if given: the gate's float32 reference);
- ``default_config``: valid for every supported shape;
- ``tolerance(dtype)``: (atol, rtol) for the comparison;
- ``cost(shape, dtype)``: (flops, bytes) — the floor is max(flops / peak, bytes / bandwidth);
- ``sources``: files whose content defines the template (hashed into library provenance).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

Inputs = dict[str, Any]
Outputs = dict[str, torch.Tensor]
Shape = Mapping[str, int]
Config = Mapping[str, Any]

DEFAULT_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-8, 1e-8),
    torch.float32: (2e-3, 2e-3),  # tl.dot may run in tf32
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}


@dataclass(frozen=True)
class Template:
    name: str
    shape_keys: tuple[str, ...]
    make_inputs: Callable[[Shape, torch.dtype, torch.device | str, int], Inputs]
    launch: Callable[..., Outputs]
    reference: Callable[[Inputs], Outputs]
    default_config: Mapping[str, Any]
    cost: Callable[[Shape, torch.dtype], tuple[float, float]]
    sources: tuple[str, ...]
    tolerances: Mapping[torch.dtype, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    # optional: a config -> problem string, empty if the config cannot run this shape
    # (used to skip configs before compiling them).
    check_config: Callable[[Shape, Config], str] | None = None
    # optional per-dtype overrides of the default (e.g. fewer pipeline stages for fp32, whose
    # tiles take twice the shared memory); ``default_for(dtype)`` merges them
    dtype_defaults: Mapping[torch.dtype, Mapping[str, Any]] = field(default_factory=dict)
    # on a GPU the search times this op as a CUDA graph replay (its launch must be capturable: no
    # host synchronisation): the GPU's time, not the host's launch cost. For decode, what the model
    # runs (a graph); for the short prefill ops (routing, norm, SwiGLU, merge, conv and their
    # backward templates) what a config changes: eagerly, a kernel shorter than its launch measures
    # the host, and in a search the host is shared with the compile workers (H200, session 9: merge
    # and conv timed up to 1.7x off a quiet re-timing, routing not even monotone in the shape).
    # The recurrence (milliseconds a launch) is timed eagerly.
    cuda_graph: bool = False
    # optional: what is timed, if not ``launch`` (same arguments). For decode, ``launch`` first
    # copies the pristine cache into the output buffers so that a check sees the whole next cache;
    # the model updates its cache in place, so the timed step must not pay for that copy.
    timed_launch: Callable[..., Outputs] | None = None
    # optional: configs (over the dtype default) for GPUs the chosen config does not fit. The
    # fast model tries them in order when a launch runs out of a GPU's resources (shared memory:
    # the recurrence default takes 144-185 KiB, more than the ~99 KiB of sm_86/sm_89 GPUs);
    # each must be valid for every supported shape and fit 48 KiB of shared memory
    fallbacks: tuple[Mapping[str, Any], ...] = ()
    # the kernels run tl.dot on float32 tiles, which a GPU does in TF32: float32 outputs are held
    # to TF32's precision by the correctness gate (momtune.gate), against a TF32 reference
    tf32: bool = False
    # optional: other inputs the launcher also takes (through other constexpr branches of its
    # kernels; not tuned, not timed), each made from the template's inputs: the compile gate
    # (momtune.aot) compiles the defaults and fallbacks on them too (e.g. recurrence_bwd's
    # gated-linear rule and initial / final states' gradients)
    gate_variants: tuple[Callable[[Inputs], Inputs], ...] = ()

    def default_for(self, dtype: torch.dtype | str) -> dict[str, Any]:
        """The default config for inputs of ``dtype`` (a torch dtype or its name)."""
        cfg = dict(self.default_config)
        for dt, over in self.dtype_defaults.items():
            if dt == dtype or str(dt).replace("torch.", "") == str(dtype).replace("torch.", ""):
                cfg.update(over)
        return cfg

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        return self.tolerances.get(dtype, DEFAULT_TOLERANCE[torch.float32])

    def source_hash(self) -> str:
        """sha256 over the template's source files (library provenance)."""
        h = hashlib.sha256()
        for src in self.sources:
            p = Path(src)
            h.update(p.name.encode())
            h.update(p.read_bytes())
        return h.hexdigest()[:16]

    def validate_shape(self, shape: Shape) -> None:
        from momtune.errors import InputError

        missing = [k for k in self.shape_keys if k not in shape]
        extra = [k for k in shape if k not in self.shape_keys]
        if missing or extra:
            raise InputError(
                f"shape for template {self.name!r}: expected keys {list(self.shape_keys)}, "
                f"missing {missing}, unknown {extra}"
            )


def reference_gradients(reference: Callable[..., Outputs], inputs: Inputs, wrt: Mapping[str, str],
                        grads: Mapping[str, torch.Tensor | None], dtype: torch.dtype = torch.float64) -> Outputs:
    """A backward template's reference: autograd of a forward template's ``reference`` run in
    ``dtype``. ``inputs``: the forward reference's inputs; ``wrt``: output name -> the forward
    input it is the gradient of; ``grads``: forward output name -> its gradient (None: unused)."""
    with torch.enable_grad():
        leaves = {k: inputs[k].detach().to(dtype).requires_grad_(True) for k in wrt.values()}
        outs = reference({**inputs, **leaves}, dtype=dtype)
        used = [k for k, g in grads.items() if g is not None]
        got = torch.autograd.grad([outs[k] for k in used], list(leaves.values()),
                                  [grads[k].to(outs[k].dtype) for k in used], allow_unused=True)
    by_input = {k: torch.zeros_like(v) if g is None else g.detach() for (k, v), g in zip(leaves.items(), got)}
    return {name: by_input[k] for name, k in wrt.items()}
