"""Tuned libraries that ship with momtune, picked at run time (issue 11, item 6; issue 13,
item 4): MOMTUNE_LIBRARY unset or ``auto`` takes the shipped library of this GPU name, compute
capability and Triton major.minor; ``none`` runs the defaults; a path runs that file. On a Triton
version the library was not tuned on (another major.minor), its configs are not used: the
defaults run, said once (warn), or it is an error (strict); a patch release fits."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from momtune import dispatch
from momtune.dispatch import Dispatcher, library_path, pick_shipped
from momtune.errors import LibraryError

from .fake_template import FAKE
from .test_dispatch import PROV, write_lib

H200 = {"gpu": "NVIDIA H200", "capability": [9, 0], "triton": "3.6.0"}


def _lib(folder: Path, name: str, gpu: str, capability: list[int], triton: str) -> Path:
    src = Path(write_lib(folder.parent, gpu=gpu, triton_version=triton))
    data = json.loads(src.read_text())
    data["provenance"]["capability"] = capability
    path = folder / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    folder = tmp_path / "libraries"
    folder.mkdir()
    _lib(folder, "h100-triton3.6.json", "NVIDIA H100 80GB HBM3", [9, 0], "3.6.0")
    _lib(folder, "h200-triton3.6.json", "NVIDIA H200", [9, 0], "3.6.0")
    _lib(folder, "h200-triton3.9.json", "NVIDIA H200", [9, 0], "3.9.1")
    (folder / "broken.json").write_text("{not json")
    return folder


@pytest.mark.parametrize(("machine", "picked"), [
    (H200, "h200-triton3.6.json"),
    ({**H200, "triton": "3.6.1"}, "h200-triton3.6.json"),  # a patch release fits
    ({**H200, "triton": "3.9.0"}, "h200-triton3.9.json"),
    ({**H200, "triton": "3.7.0"}, None),  # no library tuned with this compiler: defaults
    ({**H200, "capability": [8, 0]}, None),
    ({"gpu": "NVIDIA A100-SXM4-80GB", "capability": [8, 0], "triton": "3.6.0"}, None),
    ({"gpu": "interpreter", "capability": None, "triton": "3.9.0"}, None),
], ids=["h200", "patch", "triton3.9", "triton3.7", "other-capability", "a100", "interpreter"])
def test_the_shipped_library_of_this_gpu_and_triton_is_picked(shipped: Path, machine: dict, picked: str | None) -> None:
    got = pick_shipped(machine, shipped)
    assert (Path(got).name if got else None) == picked


def test_momtune_library_setting(shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "shipped_dir", lambda: shipped)
    assert Path(library_path(None, H200)).name == "h200-triton3.6.json"
    assert Path(library_path("auto", H200)).name == "h200-triton3.6.json"
    assert library_path("none", H200) is None
    assert library_path("/x/lib.json", H200) == "/x/lib.json"


def test_get_dispatcher_uses_the_shipped_library_when_unset(shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "shipped_dir", lambda: shipped)
    monkeypatch.setattr(dispatch, "this_machine", lambda: dict(H200))
    monkeypatch.delenv("MOMTUNE_LIBRARY", raising=False)
    dispatch.reset_dispatcher()
    try:
        assert Path(dispatch.get_dispatcher().path).name == "h200-triton3.6.json"
        monkeypatch.setenv("MOMTUNE_LIBRARY", "none")
        dispatch.reset_dispatcher()
        assert dispatch.get_dispatcher().path is None
    finally:
        dispatch.reset_dispatcher()


@pytest.mark.parametrize(("machine_triton", "policy", "used"), [
    ("3.6.3", "strict", True), ("3.6.3", "warn", True), ("3.7.0", "warn", False), ("3.7.0", "strict", None)])
def test_on_another_triton_the_library_is_not_used(tmp_path: Path, machine_triton: str, policy: str,
                                                   used: bool | None) -> None:
    path = write_lib(tmp_path, triton_version="3.6.0")
    machine = {"gpu": PROV["gpu"], "capability": None, "triton": machine_triton}
    if used is None:
        with pytest.raises(LibraryError, match=r"triton: library '3.6.0', this machine '3.7.0'"):
            Dispatcher(path, policy, machine=machine)
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        d = Dispatcher(path, policy, machine=machine)
        config, source = d.config(FAKE, {"N": 64, "C": 3}, "float32")
    assert (source == "exact") is used
    if not used:
        assert any("triton: library '3.6.0', this machine '3.7.0'" in str(w.message) for w in seen)


SHIPPED = sorted(Path(dispatch.shipped_dir()).glob("*.json"))


def test_momtune_ships_the_h200_library() -> None:
    names = [p.name for p in SHIPPED]
    assert "nvidia-h200-triton3.6.json" in names, names
    got = pick_shipped(H200)
    assert got is not None and Path(got).name == "nvidia-h200-triton3.6.json"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_a_shipped_library_is_current_and_every_config_is_in_its_search_space(path: Path) -> None:
    """A kernel edit changes its template's source hash; a shipped library tuned before it would
    run the defaults on the GPU it names (warned once). CI fails instead: re-tune on that GPU and
    export again, or drop the stale template from the shipped file (`momtune export --template`)."""
    from momtune.library import config_problem, load_library, source_problem
    from momtune.space import find_space
    from momtune.templates import library_spec, resolve_template

    lib = load_library(path)
    assert not lib.unknown, lib.unknown
    assert lib.size() > 0
    for key in ("gpu", "capability", "triton", "torch", "commit", "searched", "floor_peak"):
        assert lib.provenance.get(key), f"{path.name}: provenance.{key} missing"
    for name, tmpl in lib.templates.items():
        template = resolve_template(library_spec(name, tmpl.get("spec")))
        assert source_problem(name, tmpl, template.source_hash(), strict=True) is None, (
            f"{path.name}: template {name} changed since it was tuned ({tmpl.get('source_hash')} -> "
            f"{template.source_hash()}); re-tune on {lib.provenance['gpu']} or drop it from the shipped file")
        space = find_space(name, template=template)
        for e in lib.entries(name):
            assert config_problem(e["config"], e["shape"], template, space) is None, (name, e["shape"])
            assert e["time_ms"] > 0 and e["time_ms"] <= e["default_time_ms"] * 1.02, (name, e["shape"])
