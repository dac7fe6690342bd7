"""Triton kernels of momtune, one folder per op; each folder's ``template.py`` declares its
tunable templates (see :mod:`momtune.kernels.template`). Installed as ``momtune.kernels``.

Nothing is imported (and nothing compiles) until a template is asked for.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .template import Template

# template name -> module that defines ``TEMPLATE`` (a Template)
TEMPLATE_MODULES: dict[str, str] = {
    "routing": "routing.template",
    "routing_bwd": "routing.template_bwd",
    "recurrence": "recurrence.template",
    "recurrence_bwd": "recurrence.template_bwd",
    "merge": "merge.template",
    "merge_bwd": "merge.template_bwd",
    "conv": "conv.template",
    "conv_bwd": "conv.template_bwd",
    "decode": "decode.template",
    "norm": "norm.template",
    "norm_bwd": "norm.template_bwd",
    "swiglu": "swiglu.template",
    "swiglu_bwd": "swiglu.template_bwd",
}


def template_names() -> list[str]:
    return sorted(TEMPLATE_MODULES)


def get_template(name: str) -> "Template":
    """Load a template by name; an unknown name lists the known ones."""
    from momtune.errors import InputError

    if name not in TEMPLATE_MODULES:
        raise InputError(f"template: unknown name {name!r}; known templates: {', '.join(template_names())}")
    mod = importlib.import_module(f"{__name__}.{TEMPLATE_MODULES[name]}")
    return mod.TEMPLATE
