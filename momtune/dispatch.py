"""Run-time config lookup: which config a template runs with for a shape, from a tuned library.

``Dispatcher(path, policy).config(template, shape, dtype) -> (config, source)`` with source
``"exact"`` (the library has this shape bucket), ``"nearest"`` (same template and dtype, same
non-size keys such as H/K/V/E/topk; nearest by log-distance over the size keys N, B, T, S ...)
or ``"default"`` (the template's default config). Lookups are cached and never tune.

A library from another GPU, another Triton (major.minor: a patch release fits), or for a template
whose source changed since the search does not fit this machine. Policy ``"warn"`` warns once and uses the defaults, ``"strict"``
raises :class:`~momtune.errors.LibraryError`, ``"ignore"`` uses the library anyway. A missing or
corrupt library raises under ``"strict"`` and warns once (defaults) otherwise. ``"strict"`` also
needs every provenance field present (a missing ``source_hash`` or ``triton`` is an error).

A library is data, checked before use: an entry whose config is not a config of the template's
search space (a parameter not in it, a value not among its choices, a constraint failing for the
entry's shape; momtune's ``search_spaces/`` or ``space_dir``) runs the default under ``"warn"``,
said once per template, and raises under ``"strict"``; so do unknown fields (typos such as
``confg``), reported once. A nearest bucket lends its config only to a shape it is valid for.
``"ignore"`` uses the entries as they are.
"""
from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ConfigError, LibraryError, SearchSpaceError
from .library import (
    Library,
    config_problem,
    load_library,
    provenance_problems,
    source_problem,
)
from .provenance import triton_minor
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
                 machine: Mapping[str, Any] | None = None, template_specs: Mapping[str, str] | None = None,
                 space_dir: str | None = None) -> None:
        """``template_specs``: name -> ``module:ATTR`` of unregistered templates a lookup by name may
        load (a library's own recorded specs are never imported). ``space_dir``: a folder of search
        spaces (``<name>.toml``) for templates momtune does not ship; without one, such a template's
        configs are only checked for its parameter names."""
        if policy not in POLICIES:
            raise ConfigError(f"policy {policy!r} is not accepted; use one of {', '.join(POLICIES)}")
        self.policy = policy
        self.path = library_path
        self.library: Library | None = None
        self._warned: set[str] = set()
        self._cache: dict[tuple[Any, ...], tuple[dict[str, Any], str]] = {}
        self._usable: dict[str, bool] = {}
        self._bad: dict[str, set[int]] = {}  # template -> indices of entries whose config is refused
        self._spaces: dict[str, Any] = {}
        self.mismatch: list[str] = []
        self._lock = threading.Lock()
        self.template_specs = dict(template_specs or {})
        self.space_dir = space_dir
        if library_path is None:
            return
        try:
            self.library = load_library(library_path)
        except LibraryError as exc:
            if policy == "strict":
                raise
            self._warn("load", f"momtune: {exc}; using the default configs")
            return
        if self.library.unknown and policy != "ignore":
            msg = (f"momtune: tuned library {library_path}: " + "; ".join(self.library.unknown[:5])
                   + (f" (and {len(self.library.unknown) - 5} more)" if len(self.library.unknown) > 5 else ""))
            if policy == "strict":
                raise LibraryError(msg + " [policy strict]")
            self._warn("unknown", msg + "; these fields are ignored")
        self._machine = dict(machine) if machine is not None else this_machine()
        self.mismatch = provenance_problems(self.library.provenance, self._machine, strict=policy == "strict")
        if self.mismatch:
            msg = (f"momtune: tuned library {library_path} does not fit this machine ("
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
        if usable and self.policy != "ignore":
            tmpl = self.library.templates[name]  # type: ignore[union-attr]
            current = template.source_hash() if hasattr(template, "source_hash") else None
            problem = source_problem(name, tmpl, current, strict=self.policy == "strict")
            if problem:
                msg = f"momtune: template {name!r} of library {self.path} does not fit this checkout ({problem})"
                if tmpl.get("source_hash"):
                    msg = (f"momtune: template {name!r} has changed since library {self.path} was tuned (source "
                           f"hash {tmpl['source_hash']}, now {current})")
                if self.policy == "strict":
                    raise LibraryError(msg + " [policy strict]")
                self._warn(f"source:{name}", msg + "; using its default config")
                usable = False
        if usable and self.policy != "ignore":
            self._bad[name] = self._refused_entries(name, template)
        self._usable[name] = usable
        return usable

    def _space(self, name: str, template: Any) -> Any:
        if name not in self._spaces:
            from .space import find_space

            self._spaces[name] = find_space(name, self.space_dir, template, check=False)
        return self._spaces[name]

    def _searched(self, name: str) -> Any:
        return self.library.templates[name].get("choices") if self.library else None

    def _refused_entries(self, name: str, template: Any) -> set[int]:
        """Indices of ``name``'s entries whose config is not one of the template's for the entry's
        shape; strict raises on the first, warn says once which ones run the default."""
        try:
            space = self._space(name, template)
        except SearchSpaceError as exc:
            space, problems = None, {i: f"its search space cannot be loaded: {exc}"
                                     for i in range(len(self.library.entries(name)))}  # type: ignore[union-attr]
        else:
            problems = {}
            for i, e in enumerate(self.library.entries(name)):  # type: ignore[union-attr]
                why = config_problem(e["config"], e["shape"], template, space, self._searched(name))
                if why:
                    problems[i] = f"entries[{i}] ({_fmt_shape(e)}): config {_fmt_config(e['config'])}: {why}"
        if problems:
            msg = f"momtune: tuned library {self.path}, template {name!r}: " + "; ".join(list(problems.values())[:3])
            if len(problems) > 3:
                msg += f" (and {len(problems) - 3} more entries)"
            if self.policy == "strict":
                raise LibraryError(msg + " [policy strict]")
            self._warn(f"config:{name}", msg + "; those shapes run the default config")
        return set(problems)

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
            bad = self._bad.get(name, set())
            entries = [e for i, e in enumerate(self.library.entries(name))  # type: ignore[union-attr]
                       if e.get("dtype") == dtype and i not in bad]
            shape = dict(shape)
            exact = [e for i, e in enumerate(self.library.entries(name))  # type: ignore[union-attr]
                     if e.get("dtype") == dtype and dict(e["shape"]) == shape]
            if exact:  # a refused exact entry runs the default, not a neighbour's config
                return (dict(exact[0]["config"]), "exact") if exact[0] in entries else self._default(template, dtype)
            size = set(getattr(template, "size_keys", SIZE_KEYS))
            near = [e for e in entries if set(e["shape"]) == set(shape)
                    and all(e["shape"][k] == v for k, v in shape.items() if k not in size)
                    and self._fits(name, template, e["config"], shape)]
            if near:
                def dist(e: Mapping[str, Any]) -> tuple[float, str]:
                    d = sum((math.log(max(e["shape"][k], 1)) - math.log(max(v, 1))) ** 2
                            for k, v in shape.items() if k in size)
                    return d, str(sorted(e["shape"].items()))

                return dict(min(near, key=dist)["config"]), "nearest"
        return self._default(template, dtype)

    def _fits(self, name: str, template: Any, config: Mapping[str, Any], shape: Mapping[str, int]) -> bool:
        """A nearest bucket's config is valid for this shape too (its constraints may not hold here)."""
        if self.policy == "ignore":
            return True
        try:
            return config_problem(config, shape, template, self._space(name, template), self._searched(name)) is None
        except SearchSpaceError:
            return False

    @staticmethod
    def _default(template: Any, dtype: str) -> tuple[dict[str, Any], str]:
        default_for = getattr(template, "default_for", None)
        return (default_for(dtype) if default_for else dict(template.default_config)), "default"


def _fmt_shape(entry: Mapping[str, Any]) -> str:
    return " ".join(f"{k}{v}" for k, v in entry["shape"].items()) + f" {entry.get('dtype')}"


def _fmt_config(config: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def shipped_dir() -> Path:
    """The folder of the libraries that ship with momtune (package data)."""
    from importlib import resources

    return Path(str(resources.files("momtune.libraries")))


def pick_shipped(machine: Mapping[str, Any] | None = None, folder: Path | None = None) -> str | None:
    """The shipped library for this machine: same GPU name and compute capability, the same Triton
    major.minor if one has it, else none (its configs were measured with another compiler); None
    when momtune ships none for this GPU. Unreadable files are skipped."""
    machine = dict(machine) if machine is not None else this_machine()
    found = []
    for path in sorted((folder or shipped_dir()).glob("*.json")):
        try:
            prov = load_library(path).provenance
        except LibraryError:
            continue
        cap = prov.get("capability")
        if prov.get("gpu") != machine.get("gpu") or (list(cap) if cap else cap) != machine.get("capability"):
            continue
        if triton_minor(prov.get("triton")) == triton_minor(machine.get("triton")):
            found.append(str(path))
    return found[-1] if found else None


def library_path(setting: str | None, machine: Mapping[str, Any] | None = None) -> str | None:
    """The library file MOMTUNE_LIBRARY means: unset or ``auto`` -> the shipped one for this GPU
    (or none), ``none`` -> none (every template's defaults), anything else -> that path."""
    if setting is None or setting.strip().lower() == "auto":
        return pick_shipped(machine)
    if setting.strip().lower() == "none":
        return None
    return setting


@lru_cache(maxsize=1)
def get_dispatcher() -> Dispatcher:
    """The process-wide dispatcher from MOMTUNE_LIBRARY / MOMTUNE_POLICY (read once)."""
    from .settings import load

    s = load()
    return Dispatcher(library_path(s.library), s.policy)


def reset_dispatcher() -> None:
    """Forget the process-wide dispatcher (re-read the environment on the next call)."""
    get_dispatcher.cache_clear()
