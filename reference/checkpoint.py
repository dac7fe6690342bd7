"""Checkpoint folders in flash-linear-attention's (Hugging Face's) format, read and written.

    folder/config.json             fla ``MomConfig`` keys (model_type "mom"); HF-generic keys skipped
    folder/generation_config.json  optional; its bos/eos/pad ids win over config.json's (as in HF)
    folder/model.safetensors       weights, fla's names; else model.safetensors.index.json (shards),
                                   pytorch_model.bin or pytorch_model.bin.index.json

:func:`write` writes config.json and model.safetensors (pytorch_model.bin without the safetensors
package) each to a temporary name in the folder, then renames it over the old file, so a crash
leaves the old file or the new one, never half of one. fla's ``MomForCausalLM.from_pretrained``
loads what it writes. Errors name the file (and the key): ConfigError for config.json, InputError
for the folder and the weights.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from momtune.errors import ConfigError, InputError

from .config import MoMConfig

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX)  # in the order they are looked for
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def folder_of(path: object) -> Path:
    """The checkpoint folder ``path`` (str or PathLike), which must exist."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path: expected a folder (str or PathLike), got {type(path).__name__}")
    folder = Path(path)
    if not folder.is_dir():
        hint = (" (a Hugging Face Hub id? download it first, e.g. huggingface_hub.snapshot_download(repo_id), "
                "and pass the folder)" if not folder.exists() and str(path).count("/") == 1 else "")
        raise InputError(f"path: {str(path)!r} is not a folder holding {CONFIG} and {SAFETENSORS}{hint}")
    return folder


def _json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: not found; a checkpoint folder holds {CONFIG} (fla's MomConfig keys) "
                          f"and {SAFETENSORS}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object of config keys, got {type(data).__name__}")
    return data


def read_config(folder: Path, strict: bool = True) -> tuple[MoMConfig, torch.dtype | None]:
    """config.json (+ generation_config.json's ids) -> (MoMConfig, the dtype it records or None)."""
    data = _json(folder / CONFIG)
    gen_file = folder / GENERATION_CONFIG
    if gen_file.is_file():
        gen = _json(gen_file)
        data.update({k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gen})
    try:
        config = MoMConfig.from_dict(data, strict=strict)
    except ConfigError as e:
        raise ConfigError(f"{folder / CONFIG}: {e}") from None
    recorded = data.get("dtype", data.get("torch_dtype"))
    return config, DTYPES.get(recorded) if isinstance(recorded, str) else None


def as_config(config: object, strict: bool = True) -> MoMConfig:
    """A MoMConfig, or one built from a transformers config (``to_dict()``, e.g. fla's ``MomConfig``)."""
    if isinstance(config, MoMConfig):
        return config
    if not callable(getattr(config, "to_dict", None)):
        raise InputError(f"config: expected a MoMConfig or a transformers config, got {type(config).__name__}")
    try:
        return MoMConfig.from_dict(config.to_dict(), strict=strict)  # type: ignore[attr-defined]
    except ConfigError as e:
        raise ConfigError(f"config ({type(config).__name__}): {e}") from None


def read_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The weights of a checkpoint folder (on the CPU) and the file they came from (an index for shards)."""
    for name in WEIGHT_FILES:
        file = folder / name
        if file.is_file():
            break
    else:
        raise InputError(f"{folder}: holds no weights; expected one of {', '.join(WEIGHT_FILES)}")
    if name.endswith(".index.json"):
        index = _json(file).get("weight_map")
        if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
            raise InputError(f"{file}: weight_map: expected an object of tensor name -> shard file")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index.values())):
            part = folder / shard
            if part.parent.resolve() != folder.resolve():
                raise InputError(f"{file}: weight_map names {shard!r}, outside the folder")
            state.update(_load(part, safe=name.startswith("model.")))
        return state, file
    return _load(file, safe=name == SAFETENSORS), file


def _load(file: Path, safe: bool) -> dict[str, torch.Tensor]:
    try:
        if safe:
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise InputError(f"{file}: reading .safetensors needs the safetensors package "
                                 f"(pip install safetensors)") from None
            return load_file(str(file), device="cpu")
        state = torch.load(file, map_location="cpu", weights_only=True)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{file}: not found (named by the checkpoint's index)") from None
    except Exception as e:  # a truncated or foreign file: name it
        raise InputError(f"{file}: cannot be read as {'safetensors' if safe else 'a torch state_dict'} "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{file}: expected a dict of tensor name -> tensor")
    return state


def resolve_dtype(name: str, value: object) -> torch.dtype | None:
    """``dtype`` argument: a floating torch.dtype, its name ("bfloat16"), or None / "auto" (as stored)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str) and value.replace("torch.", "") in DTYPES:
        return DTYPES[value.replace("torch.", "")]
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    raise InputError(f"{name}: {value!r} is not accepted; give None or 'auto' (the checkpoint's dtype) or one of "
                     f"{', '.join(DTYPES)}")


def stored_dtype(state: dict[str, torch.Tensor], recorded: torch.dtype | None) -> torch.dtype:
    """The dtype the weights are stored in (the most common floating dtype; float32 when none)."""
    counts: dict[torch.dtype, int] = {}
    for v in state.values():
        if v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    if not counts:
        return recorded or torch.float32
    return max(counts, key=lambda d: counts[d])


def fla_config_dict(config: MoMConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json as fla writes it: the MoMConfig fields (fla's names) plus model_type, the class
    name and the dtype (transformers 5 reads ``dtype``, 4.x ``torch_dtype``)."""
    d = config.to_dict()
    name = str(dtype).replace("torch.", "")
    return {"architectures": ["MomForCausalLM"], "model_type": "mom", **d, "mom_backend": "gated_deltanet",
            "dtype": name, "torch_dtype": name}


def write(folder: object, config: MoMConfig, state: dict[str, torch.Tensor]) -> Path:
    """Write a checkpoint folder (created if missing): weights, then config.json, each atomically.

    Tensors sharing storage (the fast layer's projection views, a tied lm_head) are copied apart;
    a tied lm_head is left out, as transformers does (loading restores it from the embeddings)."""
    if not isinstance(folder, (str, os.PathLike)):
        raise InputError(f"save_directory: expected a folder path (str or PathLike), got {type(folder).__name__}")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise InputError(f"save_directory: {str(folder)!r} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()
               if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    dtype = stored_dtype(tensors, None)
    try:
        from safetensors.torch import save_file

        def save_weights(tmp: str) -> None:
            save_file(tensors, tmp, metadata={"format": "pt"})
        weights = SAFETENSORS
    except ImportError:  # torch only: the bin format transformers also reads
        def save_weights(tmp: str) -> None:
            torch.save(tensors, tmp)
        weights = BIN
    _atomic(path / weights, save_weights)
    for stale in WEIGHT_FILES[:WEIGHT_FILES.index(weights)]:  # would be read before the new weights
        (path / stale).unlink(missing_ok=True)
    text = json.dumps(fla_config_dict(config, dtype), indent=2, sort_keys=True) + "\n"
    _atomic(path / CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def _atomic(target: Path, write_to: Callable[[str], None]) -> None:
    """Write ``target`` through a temporary file in its folder, flushed, then renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
