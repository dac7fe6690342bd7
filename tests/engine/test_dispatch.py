"""Run-time dispatch: exact / nearest / default choices, caching, and the three policies."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import triton

from momtune.dispatch import Dispatcher, get_dispatcher, reset_dispatcher
from momtune.errors import ConfigError, InputError, LibraryError
from momtune.library import SCHEMA, atomic_write_json

from .conftest import FAKE as FAKE_SPEC
from .fake_template import FAKE

HERE = {"gpu": "interpreter", "capability": None, "triton": triton.__version__}
DEFAULT = {"BLOCK": 32, "num_warps": 1}


def entry(n: int, c: int, block: int, dtype: str = "float32") -> dict[str, Any]:
    return {"shape": {"N": n, "C": c}, "dtype": dtype, "config": {"BLOCK": block, "num_warps": 2}, "time_ms": 1.0,
            "default_time_ms": 2.0, "max_abs_err": 0.0, "max_rel_err": 0.0, "trials": 5, "study": "x"}


def write_lib(tmp_path: Path, gpu: str = "interpreter", triton_version: str | None = None,
              source_hash: str | None = None) -> str:
    lib = {"schema": SCHEMA,
           "provenance": {"gpu": gpu, "capability": None, "triton": triton_version or triton.__version__},
           "templates": {"fake": {"source_hash": source_hash or FAKE.source_hash(), "default_config": DEFAULT,
                                  "spec": FAKE_SPEC,
                                  "entries": [entry(64, 3, 16), entry(128, 3, 64), entry(64, 8, 128),
                                              entry(64, 3, 128, "bfloat16")]}}}
    path = tmp_path / "library.json"
    atomic_write_json(path, lib)
    return str(path)


CHOICES = [
    ("exact", {"N": 64, "C": 3}, "float32", ({"BLOCK": 16, "num_warps": 2}, "exact")),
    ("exact-other-nonsize", {"N": 64, "C": 8}, "float32", ({"BLOCK": 128, "num_warps": 2}, "exact")),
    ("exact-bf16", {"N": 64, "C": 3}, "bfloat16", ({"BLOCK": 128, "num_warps": 2}, "exact")),
    ("nearest-N100-to-128", {"N": 100, "C": 3}, "float32", ({"BLOCK": 64, "num_warps": 2}, "nearest")),
    ("nearest-N70-to-64", {"N": 70, "C": 3}, "float32", ({"BLOCK": 16, "num_warps": 2}, "nearest")),
    ("nearest-N1-to-64", {"N": 1, "C": 3}, "float32", ({"BLOCK": 16, "num_warps": 2}, "nearest")),
    ("nearest-only-same-C", {"N": 4096, "C": 8}, "float32", ({"BLOCK": 128, "num_warps": 2}, "nearest")),
    ("default-other-C", {"N": 64, "C": 4}, "float32", (DEFAULT, "default")),
    ("default-other-dtype", {"N": 64, "C": 3}, "float16", (DEFAULT, "default")),
]


@pytest.mark.parametrize("shape,dtype,expected", [c[1:] for c in CHOICES], ids=[c[0] for c in CHOICES])
def test_exact_nearest_default(tmp_path: Path, shape: dict[str, int], dtype: str, expected: tuple) -> None:
    d = Dispatcher(write_lib(tmp_path), "strict", machine=HERE)
    assert d.config(FAKE, shape, dtype) == expected


def test_torch_dtype_and_template_name_and_detected_machine(tmp_path: Path) -> None:
    import torch

    d = Dispatcher(write_lib(tmp_path), "strict", template_specs={"fake": FAKE_SPEC})  # the interpreter, this Triton
    assert d.config("fake", {"N": 64, "C": 3}, torch.float32) == ({"BLOCK": 16, "num_warps": 2}, "exact")
    with pytest.raises(InputError, match="not a registered template"):  # the library's spec is not imported
        Dispatcher(write_lib(tmp_path), "strict").config("fake", {"N": 64, "C": 3}, torch.float32)


def test_no_library_gives_defaults() -> None:
    d = Dispatcher(None)
    assert d.config(FAKE, {"N": 64, "C": 3}, "float32") == (DEFAULT, "default")


def test_lookups_are_cached_and_return_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Dispatcher(write_lib(tmp_path), "strict", machine=HERE)
    calls = []
    real = d._lookup
    monkeypatch.setattr(d, "_lookup", lambda *a: calls.append(a) or real(*a))
    for _ in range(3):
        cfg, _src = d.config(FAKE, {"N": 100, "C": 3}, "float32")
        cfg["BLOCK"] = -1  # callers may not corrupt the cache
    d.config(FAKE, {"C": 3, "N": 100}, "float32")
    assert len(calls) == 1 and d.config(FAKE, {"N": 100, "C": 3}, "float32")[0]["BLOCK"] == 64


MISMATCH = [("other-gpu", {"gpu": "NVIDIA H100 80GB HBM3"}, "gpu"),
            ("other-triton", {"triton_version": "3.6.0"}, "triton")]


@pytest.mark.parametrize("kw,what", [m[1:] for m in MISMATCH], ids=[m[0] for m in MISMATCH])
@pytest.mark.parametrize("policy", ["warn", "strict", "ignore"])
def test_provenance_mismatch_policies(tmp_path: Path, kw: dict[str, str], what: str, policy: str) -> None:
    path = write_lib(tmp_path, **kw)
    if policy == "strict":
        with pytest.raises(LibraryError, match=f"{what}: library"):
            Dispatcher(path, policy, machine=HERE)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = Dispatcher(path, policy, machine=HERE)
        results = [d.config(FAKE, {"N": n, "C": 3}, "float32") for n in (64, 100, 64)]
    mine = [w for w in caught if "momtune" in str(w.message)]
    if policy == "warn":
        assert len(mine) == 1 and what in str(mine[0].message) and path in str(mine[0].message)
        assert all(r == (DEFAULT, "default") for r in results)
    else:
        assert mine == [] and results[0] == ({"BLOCK": 16, "num_warps": 2}, "exact") and results[1][1] == "nearest"


@pytest.mark.parametrize("policy", ["warn", "strict", "ignore"])
def test_changed_template_source_policies(tmp_path: Path, policy: str) -> None:
    d = Dispatcher(write_lib(tmp_path, source_hash="0123456789abcdef"), policy, machine=HERE)
    if policy == "strict":
        with pytest.raises(LibraryError, match="'fake' has changed"):
            d.config(FAKE, {"N": 64, "C": 3}, "float32")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [d.config(FAKE, {"N": n, "C": 3}, "float32") for n in (64, 128)]
    mine = [w for w in caught if "momtune" in str(w.message)]
    if policy == "warn":
        assert len(mine) == 1 and "0123456789abcdef" in str(mine[0].message)
        assert got == [(DEFAULT, "default")] * 2
    else:
        assert mine == [] and got[0][1] == "exact"


@pytest.mark.parametrize("content", [None, "{broken", '{"schema": "other/1"}'], ids=["missing", "corrupt", "schema"])
@pytest.mark.parametrize("policy", ["warn", "strict", "ignore"])
def test_unusable_library_file(tmp_path: Path, content: str | None, policy: str) -> None:
    path = tmp_path / "lib.json"
    if content is not None:
        path.write_text(content)
    if policy == "strict":
        with pytest.raises(LibraryError, match=str(path)):
            Dispatcher(str(path), policy, machine=HERE)
        return
    with pytest.warns(RuntimeWarning, match=str(path)) as rec:
        d = Dispatcher(str(path), policy, machine=HERE)
        assert d.config(FAKE, {"N": 64, "C": 3}, "float32") == (DEFAULT, "default")
    assert len([w for w in rec if "momtune" in str(w.message)]) == 1


def test_get_dispatcher_reads_settings_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_lib(tmp_path)
    reset_dispatcher()
    try:
        monkeypatch.setenv("MOMTUNE_LIBRARY", path)
        monkeypatch.setenv("MOMTUNE_POLICY", "strict")
        d = get_dispatcher()
        assert d.path == path and d.policy == "strict" and get_dispatcher() is d
        monkeypatch.setenv("MOMTUNE_POLICY", "ignore")
        assert get_dispatcher() is d  # read once
        reset_dispatcher()
        assert get_dispatcher().policy == "ignore"
        reset_dispatcher()
        monkeypatch.setenv("MOMTUNE_POLICY", "sometimes")
        with pytest.raises(ConfigError, match="strict, warn, ignore"):
            get_dispatcher()
    finally:
        reset_dispatcher()


def test_bad_policy_rejected() -> None:
    with pytest.raises(ConfigError, match="strict, warn, ignore"):
        Dispatcher(None, "loose")
