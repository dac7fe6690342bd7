"""Where a measurement comes from: GPU, software versions, code version.

``collect()`` describes this process's device. In the Triton interpreter the GPU is
``"interpreter"`` (timings are interpreter timings); a CUDA device gives its name, compute
capability, SM count, driver and CUDA versions.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# keys whose difference makes a tuned library unfit for this machine
MATCH_KEYS = ("gpu", "capability", "triton")


def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (study names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def current_gpu(device: int | None = None) -> str:
    """This process's GPU name, ``"interpreter"`` under TRITON_INTERPRET, else ``"cpu"``."""
    from .settings import interpreter_mode

    if interpreter_mode():
        return "interpreter"
    import torch

    if torch.cuda.is_available():
        return str(torch.cuda.get_device_name(device))
    return "cpu"


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    """The commit of the momtune checkout, if it is one (with ``-dirty`` when modified)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return None


def fla_version() -> str:
    """flash-linear-attention's installed version (read from its package metadata, so fla is not
    imported), or ``"not installed"``."""
    from importlib import metadata

    for dist in ("flash-linear-attention", "fla-core"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def collect(device: int | None = None) -> dict[str, Any]:
    """Provenance of measurements made by this process (keys of the library's ``provenance``)."""
    import torch
    import triton

    from . import __version__

    gpu = current_gpu(device)
    prov: dict[str, Any] = {"gpu": gpu, "capability": None, "sm_count": None, "driver": None,
                            "cuda": torch.version.cuda, "python": platform.python_version(),
                            "torch": torch.__version__, "triton": triton.__version__, "fla": fla_version(),
                            "momtune": __version__, "created": now_iso(), "commit": git_commit(),
                            "host": os.uname().nodename}
    if gpu not in ("interpreter", "cpu") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        prov["capability"] = [int(props.major), int(props.minor)]
        prov["sm_count"] = int(props.multi_processor_count)
        prov["driver"] = _driver_version()
    return prov


def mismatches(recorded: Mapping[str, Any], current: Mapping[str, Any],
               keys: tuple[str, ...] = MATCH_KEYS) -> list[str]:
    """Human-readable differences between a recorded provenance and this machine's."""
    out = []
    for key in keys:
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if key == "triton" and a != b and triton_minor(a) is not None and triton_minor(a) == triton_minor(b):
            continue  # a patch release: same code generation, the tuned configs hold
        if a != b:
            out.append(f"{key}: library {a!r}, this machine {b!r}")
    return out


def triton_minor(version: Any) -> tuple[int, int] | None:
    """``"3.6.0"`` -> ``(3, 6)``: libraries match Triton on major.minor (a patch release keeps the
    code generation a tuned config was measured with); None for an unreadable version."""
    m = re.match(r"^(\d+)\.(\d+)", str(version or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None
