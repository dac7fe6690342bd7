"""Run-time config lookup: which config a template runs with for a shape, from a tuned library.

``Dispatcher(path, policy).config(template, shape, dtype) -> (config, source)`` with source
``"exact"`` (the library has this shape bucket), ``"nearest"`` (same template and dtype, same
non-size keys such as H/K/V/E/topk; nearest by log-distance over the size keys N, B, T, S ...)
or ``"default"`` (the template's default config). Lookups are cached and never tune.

A library from another GPU, another Triton, or for a template whose source changed since the
search does not fit this machine. Policy ``"warn"`` warns once and uses the defaults, ``"strict"``
raises :class:`~momtune.errors.LibraryError`, ``"ignore"`` uses the library anyway. A missing or
corrupt library raises under ``"strict"`` and warns once (defaults) otherwise.
"""
from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from .errors import ConfigError, LibraryError
from .library import Library, load_library
from .settings import POLICIES

# shape keys that measure problem size (a nearest bucket may differ in these); every other key
# (H, K, V, E, topk, shared, D, ...) must match exactly. A template may declare ``size_keys``.
SIZE_KEYS = frozenset({"N", "B", "T", "S", "L", "Np"})


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def this_machine() -> dict[str, Any]:
    """The provenance keys a library must match: GPU name, compute capability, Triton version."""
    import triton

    from .provenance import current_gpu

    gpu = current_gpu()
    cap = None
    if gpu not in ("interpreter", "cpu"):
        import torch

        cap = list(torch.cuda.get_device_capability())
    return {"gpu": gpu, "capability": cap, "triton": triton.__version__}


class Dispatcher:
    """Config lookup from one library (or none: every lookup gives the template's default)."""

    def __init__(self, library_path: str | None = None, policy: str = "warn",
                 machine: Mapping[str, Any] | None = None, template_specs: Mapping[str, str] | None = None) -> None:
        """``template_specs``: name -> ``module:ATTR`` of unregistered templates a lookup by name may
        load (a library's own recorded specs are never imported)."""
        if policy not in POLICIES:
            raise ConfigError(f"policy {policy!r} is not accepted; use one of {', '.join(POLICIES)}")
        self.policy = policy
        self.path = library_path
        self.library: Library | None = None
        self._warned: set[str] = set()
        self._cache: dict[tuple[Any, ...], tuple[dict[str, Any], str]] = {}
        self._usable: dict[str, bool] = {}
        self.mismatch: list[str] = []
        self._lock = threading.Lock()
        self.template_specs = dict(template_specs or {})
        if library_path is None:
            return
        try:
            self.library = load_library(library_path)
        except LibraryError as exc:
            if policy == "strict":
                raise
            self._warn("load", f"momtune: {exc}; using the default configs")
            return
        self._machine = dict(machine) if machine is not None else this_machine()
        from .provenance import mismatches

        self.mismatch = mismatches(self.library.provenance, self._machine)
        if self.mismatch:
            msg = (f"momtune: tuned library {library_path} was made on another machine ("
                   + "; ".join(self.mismatch) + ")")
            if policy == "strict":
                raise LibraryError(msg + " [policy strict]")
            if policy == "warn":
                self._warn("provenance", msg + "; using the default configs (MOMTUNE_POLICY=ignore uses it anyway)")

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _template_usable(self, name: str, template: Any) -> bool:
        """Library entries of this template apply here (provenance and source hash)."""
        if name in self._usable:
            return self._usable[name]
        usable = self.library is not None and name in self.library.templates
        if usable and self.mismatch and self.policy != "ignore":
            usable = False
        if usable:
            recorded = self.library.templates[name].get("source_hash")  # type: ignore[union-attr]
            current = template.source_hash() if hasattr(template, "source_hash") else recorded
            if recorded and current != recorded:
                msg = (f"momtune: template {name!r} has changed since library {self.path} was tuned (source hash "
                       f"{recorded}, now {current})")
                if self.policy == "strict":
                    raise LibraryError(msg + " [policy strict]")
                if self.policy == "warn":
                    self._warn(f"source:{name}", msg + "; using its default config")
                    usable = False
        self._usable[name] = usable
        return usable

    def config(self, template: Any, shape: Mapping[str, int], dtype: Any) -> tuple[dict[str, Any], str]:
        """(config, source) for a template (name or Template), a shape dict and a dtype."""
        name = template if isinstance(template, str) else template.name
        key = (name, tuple(sorted(shape.items())), dtype_name(dtype))
        hit = self._cache.get(key)
        if hit is None:
            with self._lock:
                hit = self._lookup(template, name, shape, dtype_name(dtype))
                self._cache[key] = hit
        return dict(hit[0]), hit[1]

    def _lookup(self, template: Any, name: str, shape: Mapping[str, int], dtype: str) -> tuple[dict[str, Any], str]:
        if isinstance(template, str):
            from .templates import library_spec, resolve_template

            recorded = self.library.templates.get(name, {}).get("spec") if self.library else None
            template = resolve_template(library_spec(name, recorded, self.template_specs))
        if self._template_usable(name, template):
            entries = [e for e in self.library.entries(name) if e.get("dtype") == dtype]  # type: ignore[union-attr]
            shape = dict(shape)
            for e in entries:
                if dict(e["shape"]) == shape:
                    return dict(e["config"]), "exact"
            size = set(getattr(template, "size_keys", SIZE_KEYS))
            near = [e for e in entries if set(e["shape"]) == set(shape)
                    and all(e["shape"][k] == v for k, v in shape.items() if k not in size)]
            if near:
                def dist(e: Mapping[str, Any]) -> tuple[float, str]:
                    d = sum((math.log(max(e["shape"][k], 1)) - math.log(max(v, 1))) ** 2
                            for k, v in shape.items() if k in size)
                    return d, str(sorted(e["shape"].items()))

                return dict(min(near, key=dist)["config"]), "nearest"
        default_for = getattr(template, "default_for", None)
        return (default_for(dtype) if default_for else dict(template.default_config)), "default"


@lru_cache(maxsize=1)
def get_dispatcher() -> Dispatcher:
    """The process-wide dispatcher from MOMTUNE_LIBRARY / MOMTUNE_POLICY (read once)."""
    from .settings import load

    s = load()
    return Dispatcher(s.library, s.policy)


def reset_dispatcher() -> None:
    """Forget the process-wide dispatcher (re-read the environment on the next call)."""
    get_dispatcher.cache_clear()
