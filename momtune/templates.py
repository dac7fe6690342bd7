"""Resolve a template spec to a :class:`~momtune.kernels.template.Template`.

A spec is a registered name (``"recurrence"``, see ``momtune.kernels.TEMPLATE_MODULES``) or
``"package.module:ATTR"`` naming a Template object anywhere importable (used by tests and by
kernel engineers trying a template before registering it). Specs are strings so that worker
processes (spawned, not forked) can resolve the same template.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    from momtune.kernels.template import Template

_CACHE: dict[str, Any] = {}


def resolve_template(spec: "str | Template") -> "Template":
    """The Template for a spec (cached); a Template passes through."""
    if not isinstance(spec, str):
        return spec
    if spec in _CACHE:
        return _CACHE[spec]
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"template: cannot load {spec!r}: {exc}") from None
    else:
        from momtune.kernels import get_template

        obj = get_template(spec)
    for attr in ("name", "shape_keys", "make_inputs", "launch", "reference", "default_config"):
        if not hasattr(obj, attr):
            raise InputError(f"template: {spec!r} is not a Template (no {attr!r})")
    _CACHE[spec] = obj
    return obj


def library_spec(name: str, recorded: str | None, allowed: Mapping[str, str] | None = None) -> str:
    """The spec to load for a library's entries under template ``name``. A library is data, shared
    and committed: a registered name is loaded as registered, and a ``module:ATTR`` spec the
    library records is never imported on its word; an unregistered template is loaded only from
    a spec the user gives for that name (``allowed``: name -> spec, e.g. verify's --template-spec)."""
    if allowed and name in allowed:
        return allowed[name]
    if name in registered_names():
        return name
    hint = f" (the library records {recorded!r})" if recorded and recorded != name else ""
    raise InputError(f"template {name!r}: not a registered template{hint}; a library never names code to "
                     f"import: to load it, pass --template-spec {name}=MODULE:ATTR")


def registered_names() -> list[str]:
    from momtune.kernels import template_names

    return template_names()
