"""Hugging Face Auto classes for momtune checkpoints (optional: needs transformers).

    import momtune.hf
    momtune.hf.register()                          # "momtune", or "fla" when fla owns model_type "mom"
    model = AutoModelForCausalLM.from_pretrained(folder)   # a momtune.MoMForCausalLM after "momtune"

The entry point that always works (with or without transformers, whatever else is imported) is
``momtune.MoMForCausalLM.from_pretrained(folder)``; :func:`register` only lets transformers'
``AutoConfig`` / ``AutoModelForCausalLM`` reach it. flash-linear-attention registers its own
``MomConfig`` / ``MomForCausalLM`` for "mom" when ``fla.models`` is imported, and it registers
with ``exist_ok=True``: importing fla, before or after :func:`register`, makes the Auto classes
build fla's model. :func:`register` then changes nothing and returns "fla"; load momtune's with
``MoMForCausalLM.from_pretrained`` (the same folder loads in both: the format is fla's).

Nothing happens at import time; transformers is imported by :func:`register` only.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from momtune.errors import InputError

MODEL_TYPE = "mom"
_CLASSES: tuple[type, type] | None = None
#: from_pretrained keywords transformers' Auto classes pass on (Hub options): a local folder needs none of
#: them (``subfolder`` is joined to the folder).
HUB_KEYWORDS = frozenset({"cache_dir", "force_download", "proxies", "revision", "token", "local_files_only",
                          "subfolder", "_commit_hash", "trust_remote_code", "adapter_kwargs", "code_revision",
                          "resume_download", "use_auth_token"})


def classes() -> tuple[type, type]:
    """(config class, model class) for transformers' Auto registries (built once, on first call)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _build()
    return _CLASSES


def _build() -> tuple[type, type]:
    from transformers import PreTrainedConfig

    from momtune.reference.config import MoMConfig

    generic = ("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")  # PreTrainedConfig's own
    fields = {f.name: f.default for f in dataclasses.fields(MoMConfig) if f.name not in generic}

    class MomtuneMomConfig(PreTrainedConfig):
        """fla's ``MomConfig`` keys as a transformers config (momtune's, for the Auto classes)."""

        model_type = MODEL_TYPE

        def __init__(self, **kwargs: Any) -> None:
            for name, default in fields.items():
                setattr(self, name, kwargs.pop(name, default))
            super().__init__(**kwargs)

    class AutoMoMForCausalLM:
        """What ``AutoModelForCausalLM.from_pretrained`` builds for model_type "mom" after :func:`register`:
        a :class:`momtune.MoMForCausalLM` (``backend``, ``dtype`` / ``torch_dtype``, ``device`` /
        ``device_map`` (one device) as its ``from_pretrained``)."""

        config_class = MomtuneMomConfig

        @classmethod
        def from_pretrained(cls, path: str | os.PathLike, *model_args: Any, config: Any = None,
                            **kwargs: Any) -> Any:
            from momtune.lm import MoMForCausalLM

            if model_args:
                raise InputError(f"from_pretrained: positional arguments {model_args!r} are not accepted")
            if kwargs.get("subfolder"):
                path = os.path.join(path, kwargs["subfolder"])
            extra = {k: v for k, v in kwargs.items() if k not in HUB_KEYWORDS}
            return MoMForCausalLM.from_pretrained(path, config=config, **extra)

    return MomtuneMomConfig, AutoMoMForCausalLM


def owner() -> str | None:
    """Who holds model_type "mom" in transformers' AutoConfig: "momtune", "fla", another module's name, or None."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        return None
    cls = CONFIG_MAPPING[MODEL_TYPE]
    if _CLASSES is not None and cls is _CLASSES[0]:
        return "momtune"
    module = cls.__module__
    return "fla" if module == "fla" or module.startswith("fla.") else module


def register() -> str:
    """Register momtune's config and model classes for model_type "mom" unless it is taken; return
    who holds it now ("momtune", or "fla": fla's Auto classes stay, see the module docstring)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise InputError("momtune.hf.register: needs transformers (pip install transformers); without it "
                         "load checkpoints with momtune.MoMForCausalLM.from_pretrained(folder)") from None
    holder = owner()
    if holder is not None:
        return holder
    config_cls, model_cls = classes()
    AutoConfig.register(MODEL_TYPE, config_cls)
    AutoModelForCausalLM.register(config_cls, model_cls)
    return "momtune"
