"""momtune export never destroys what it did not make (issue 15): replacing the library of another
GPU or Triton version, a library with templates this export lacks, or a file that is not a
library needs --force; without it the command exits 2 naming the file, what it holds and --force,
and the file is untouched. An export with no entry writes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from momtune.cli import main
from momtune.errors import InputError, LibraryError
from momtune.library import SCHEMA, atomic_write_json, export_library, load_library

GPU = "NVIDIA H200"


def _study(url: str, template: str, n: int, ok: bool = True, gpu: str = GPU, triton: str = "3.6.0") -> None:
    name = f"{template}:{gpu.lower().replace(' ', '-')}:N{n}-C3-float32"
    study = optuna.create_study(study_name=name, storage=url, direction="minimize")
    for k, v in {"template": template, "shape": {"N": n, "C": 3}, "dtype": "float32", "gpu": gpu,
                 "provenance": {"gpu": gpu, "capability": [9, 0], "triton": triton,
                                "created": "2026-11-01T00:00:00", "source_hash": "abc"},
                 "default_config": {"BLOCK": 32}, "default_time_ms": 1.0}.items():
        study.set_user_attr(k, v)
    dist = {"BLOCK": CategoricalDistribution([16, 32, 64])}
    study.add_trial(optuna.trial.create_trial(
        params={"BLOCK": 16}, distributions=dist, value=0.5 if ok else None,
        state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
        user_attrs={"status": "ok" if ok else "wrong_answer", "config": {"BLOCK": 16}, "time_ms": 0.5}))


@pytest.fixture
def storage(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _study(url, "fake", 64)
    _study(url, "other", 64)
    return url


def _library(path: Path, gpu: str = GPU, triton: str = "3.6.0", templates: tuple[str, ...] = ("fake",)) -> bytes:
    atomic_write_json(path, {"schema": SCHEMA, "provenance": {"gpu": gpu, "capability": [9, 0], "triton": triton},
                             "templates": {t: {"source_hash": "abc", "entries": [
                                 {"shape": {"N": 8, "C": 3}, "dtype": "float32", "config": {"BLOCK": 64}}]}
                                 for t in templates}})
    return path.read_bytes()


@pytest.mark.parametrize("gpu,triton,held", [("NVIDIA H100 80GB HBM3", "3.6.0", "GPU 'NVIDIA H100 80GB HBM3', Triton 3.6.0"),
                                             (GPU, "3.1.0", "GPU 'NVIDIA H200', Triton 3.1.0")],
                         ids=["other-gpu", "other-triton"])
def test_replacing_another_machines_library_needs_force(storage: str, tmp_path: Path, gpu: str, triton: str,
                                                        held: str) -> None:
    out = tmp_path / "lib.json"
    before = _library(out, gpu, triton)
    with pytest.raises(InputError) as err:
        export_library(storage, out, note=lambda m: None)
    msg = str(err.value)
    assert str(out) in msg and f"holds the library of {held} (1 entries)" in msg and "--force" in msg
    assert "this export is of GPU 'NVIDIA H200', Triton 3.6.0" in msg
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["lib.json", "s.db"]
    lib = export_library(storage, out, note=lambda m: None, force=True)
    assert load_library(out).provenance["triton"] == "3.6.0" and lib["provenance"]["gpu"] == GPU


def test_replacing_a_file_that_is_not_a_library_needs_force(storage: str, tmp_path: Path) -> None:
    out = tmp_path / "notes.json"
    out.write_text('{"my": "notes"}')
    with pytest.raises(InputError, match=r"notes.json: exists and is not a momtune library .*--force"):
        export_library(storage, out, note=lambda m: None)
    assert out.read_text() == '{"my": "notes"}'
    export_library(storage, out, note=lambda m: None, force=True)
    assert load_library(out).entries("fake")


def test_an_export_of_fewer_templates_does_not_drop_the_others_without_force(storage: str, tmp_path: Path) -> None:
    out = tmp_path / "lib.json"
    export_library(storage, out, note=lambda m: None)
    before = out.read_bytes()
    with pytest.raises(InputError, match=r"holds entries of templates other .*that this export has none of.*--force"):
        export_library(storage, out, templates=["fake"], note=lambda m: None)
    assert out.read_bytes() == before
    export_library(storage, out, note=lambda m: None)  # the same GPU, Triton and templates: replaced
    assert load_library(out).templates.keys() == {"fake", "other"}
    export_library(storage, out, templates=["fake"], note=lambda m: None, force=True)
    assert load_library(out).templates.keys() == {"fake"}


def test_the_library_records_the_choices_searched(storage: str, tmp_path: Path) -> None:
    lib = export_library(storage, tmp_path / "lib.json", note=lambda m: None)
    assert lib["templates"]["fake"]["choices"] == {"BLOCK": [16, 32, 64]}
    assert load_library(tmp_path / "lib.json").unknown == []


def test_an_export_with_no_entry_writes_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    _study(url, "fake", 64, ok=False)
    out = tmp_path / "lib.json"
    before = _library(out)
    with pytest.raises(LibraryError, match=r"nothing to export: no study of fake on GPU 'NVIDIA H200' has a config "
                                           r"that passed its check; .*lib.json not written"):
        export_library(url, out, note=lambda m: None, force=True)
    assert out.read_bytes() == before


def test_cli_names_the_file_what_it_holds_and_force(storage: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "h100.json"
    before = _library(out, "NVIDIA H100 80GB HBM3", "3.1.0")
    argv = ["export", "--storage", storage, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "h100.json" in err and "NVIDIA H100 80GB HBM3" in err and "3.1.0" in err and "--force" in err
    assert "Traceback" not in err and out.read_bytes() == before
    assert main([*argv, "--force"]) == 0
    assert json.loads(out.read_text())["provenance"]["gpu"] == GPU
