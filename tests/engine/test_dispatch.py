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
PROV = {**HERE, "sm_count": None, "driver": None, "cuda": None, "torch": "2.13.0", "momtune": "0.1.0",
        "created": "2026-11-28T00:00:00+00:00", "commit": None}  # every field a library has
DEFAULT = {"BLOCK": 32, "num_warps": 1}


def entry(n: int, c: int, block: int, dtype: str = "float32") -> dict[str, Any]:
    return {"shape": {"N": n, "C": c}, "dtype": dtype, "config": {"BLOCK": block, "num_warps": 2}, "time_ms": 1.0,
            "default_time_ms": 2.0, "max_abs_err": 0.0, "max_rel_err": 0.0, "trials": 5, "study": "x"}


def write_lib(tmp_path: Path, gpu: str = "interpreter", triton_version: str | None = None,
              source_hash: str | None = None) -> str:
    lib = {"schema": SCHEMA,
           "provenance": {**PROV, "gpu": gpu, "capability": None, "triton": triton_version or triton.__version__},
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
    got, msgs = _caught(lambda: Dispatcher(str(path), policy, machine=HERE).config(FAKE, {"N": 64, "C": 3}, "float32"))
    assert got == (DEFAULT, "default") and len(msgs) == 1 and str(path) in msgs[0]


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


# ---- strict provenance: every field present (issue 15)


@pytest.mark.parametrize("field", ["source_hash", "triton", "gpu", "capability", "driver", "commit"])
def test_strict_needs_every_provenance_field(tmp_path: Path, field: str) -> None:
    """A library missing a provenance field (or its template's source_hash) was accepted by strict
    when the field was absent rather than different (capability None == None; no source_hash: no
    check at all)."""
    import json

    path = Path(write_lib(tmp_path))
    lib = json.loads(path.read_text())
    (lib["templates"]["fake"] if field == "source_hash" else lib["provenance"]).pop(field)
    path.write_text(json.dumps(lib))
    with pytest.raises(LibraryError, match=rf"{field}.* missing.*\[policy strict\]"):
        Dispatcher(str(path), "strict", machine=HERE).config(FAKE, {"N": 64, "C": 3}, "float32")
    if field in ("source_hash", "driver", "commit"):  # warn: not a mismatch, the library is used
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = Dispatcher(str(path), "warn", machine=HERE).config(FAKE, {"N": 64, "C": 3}, "float32")
        assert got == ({"BLOCK": 16, "num_warps": 2}, "exact")


# ---- a library is data: configs outside the search space, unknown fields (issue 15)

SPACED = [({"N": 64, "C": 3}, {"BLOCK": 64, "num_warps": 2}),  # valid
          ({"N": 128, "C": 3}, {"BLOCK": 256, "num_warps": 1}),  # 256 is not a choice
          ({"N": 64, "C": 8}, {"BLOCK": 64, "num_warps": 2, "EXTRA": 1}),  # not a parameter
          ({"N": 2, "C": 1}, {"BLOCK": 128, "num_warps": 1}),  # fails BLOCK <= max(16, 2 * N * C) at its shape
          ({"N": 64, "C": 5}, {"BLOCK": 64})]  # num_warps missing: launching it raises KeyError


def spaced_lib(tmp_path: Path) -> str:
    import json

    path = Path(write_lib(tmp_path))
    lib = json.loads(path.read_text())
    lib["templates"]["fake"]["entries"] = [{**entry(1, 1, 1), "shape": s, "config": c} for s, c in SPACED]
    path.write_text(json.dumps(lib))
    return str(path)


def _caught(fn: Any) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if "momtune" in str(w.message)]


def test_configs_outside_the_search_space_run_the_default_under_warn(tmp_path: Path) -> None:
    from .conftest import SPACES

    d = Dispatcher(spaced_lib(tmp_path), "warn", machine=HERE, space_dir=SPACES)
    shapes = [s for s, _ in SPACED] + [{"N": 100, "C": 3}, {"N": 3, "C": 3}] * 2
    got, msgs = _caught(lambda: [d.config(FAKE, s, "float32") for s in shapes])
    assert got[0] == ({"BLOCK": 64, "num_warps": 2}, "exact")
    assert got[1:5] == [(DEFAULT, "default")] * 4  # the refused entries: the default, not a neighbour's config
    assert got[5] == ({"BLOCK": 64, "num_warps": 2}, "nearest")  # N128 (refused) is not lent
    assert got[6] == (DEFAULT, "default")  # BLOCK 64 > max(16, 18): the nearest config does not fit N3 C3
    assert len(msgs) == 1, msgs  # said once
    assert "BLOCK=256 is not one of [16, 32, 64, 128]" in msgs[0] and "EXTRA" in msgs[0]
    assert "fake.toml" in msgs[0] and "run the default config" in msgs[0]


def test_configs_outside_the_search_space_raise_under_strict(tmp_path: Path) -> None:
    from .conftest import SPACES

    d = Dispatcher(spaced_lib(tmp_path), "strict", machine=HERE, space_dir=SPACES)
    with pytest.raises(LibraryError, match=r"entries\[1\] \(N128 C3 float32\): config BLOCK=256 num_warps=1: "
                                           r"outside the search space .*fake.toml: BLOCK=256 is not one of"):
        d.config(FAKE, {"N": 64, "C": 3}, "float32")


def test_without_a_space_file_the_parameters_and_the_recorded_choices_are_checked(tmp_path: Path) -> None:
    import json

    path = spaced_lib(tmp_path)
    got, msgs = _caught(lambda: [Dispatcher(path, "warn", machine=HERE).config(FAKE, s, "float32")
                                 for s, _ in SPACED])
    assert [g[1] for g in got] == ["exact", "exact", "default", "exact", "default"]  # names only: EXTRA, no num_warps
    assert "['EXTRA'] are not the template's" in msgs[0] and "['num_warps'] missing" in msgs[0]
    lib = json.loads(Path(path).read_text())
    lib["templates"]["fake"]["choices"] = {"BLOCK": [16, 32, 64, 128], "num_warps": [1, 2, 4]}  # export records them
    Path(path).write_text(json.dumps(lib))
    got, msgs = _caught(lambda: [Dispatcher(path, "warn", machine=HERE).config(FAKE, s, "float32")
                                 for s, _ in SPACED])
    assert [g[1] for g in got] == ["exact", "default", "default", "exact", "default"]
    assert "BLOCK=256 is not one of [16, 32, 64, 128], the choices the library records as searched" in msgs[0]


def test_an_invalid_entry_does_not_make_every_forward_raise_under_warn(tmp_path: Path) -> None:
    """A matching entry without num_warps: the dispatched config used to raise KeyError at every
    launch; under warn it is refused once and the default runs."""
    import torch

    d = Dispatcher(spaced_lib(tmp_path), "warn", machine=HERE)
    shape = {"N": 64, "C": 5}
    inputs = FAKE.make_inputs(shape, torch.float32, "cpu", 0)
    (_cfg, source), msgs = _caught(lambda: [d.config(FAKE, shape, torch.float32) for _ in range(3)][-1])
    assert len(msgs) == 1 and "num_warps" in msgs[0] and source == "default"
    for _ in range(3):  # every forward runs
        y = FAKE.launch(inputs, d.config(FAKE, shape, torch.float32)[0])["y"]
    assert torch.allclose(y.double(), FAKE.reference(inputs)["y"])
    with pytest.raises(KeyError):  # what the entry's own config does
        FAKE.launch(inputs, SPACED[4][1])


@pytest.mark.parametrize("policy", ["warn", "strict", "ignore"])
def test_unknown_fields_are_reported(tmp_path: Path, policy: str) -> None:
    import json

    path = Path(write_lib(tmp_path))
    lib = json.loads(path.read_text())
    lib["templates"]["fake"]["entries"][0]["confg"] = {"BLOCK": 64}  # a typo of config
    lib["templates"]["fake"]["sorce_hash"] = "x"
    path.write_text(json.dumps(lib))
    if policy == "strict":
        with pytest.raises(LibraryError, match=r"templates\.fake\.entries\[0\]\.confg: unknown field"):
            Dispatcher(str(path), policy, machine=HERE)
        return
    got, msgs = _caught(lambda: Dispatcher(str(path), policy, machine=HERE).config(FAKE, {"N": 64, "C": 3},
                                                                                   "float32"))
    assert got == ({"BLOCK": 16, "num_warps": 2}, "exact")
    if policy == "warn":
        assert len(msgs) == 1 and "entries[0].confg: unknown field" in msgs[0] and "fake.sorce_hash" in msgs[0]
    else:
        assert msgs == []


def test_ignore_uses_the_entries_as_they_are(tmp_path: Path) -> None:
    from .conftest import SPACES

    d = Dispatcher(spaced_lib(tmp_path), "ignore", machine=HERE, space_dir=SPACES)
    got, msgs = _caught(lambda: d.config(FAKE, {"N": 128, "C": 3}, "float32"))
    assert got == ({"BLOCK": 256, "num_warps": 1}, "exact") and msgs == []
