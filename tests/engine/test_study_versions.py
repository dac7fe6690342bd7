"""A study is of one version of a template's kernels: a search after the kernels changed does not
resume the old study (its timings and results are of another kernel) but starts
``<name>@<source hash>``, and export takes the current version's study per shape."""
from __future__ import annotations

import json

import optuna
import pytest

from momtune.kernels.template import Template
from momtune.library import export_library
from momtune.search import SearchOptions, search
from momtune.study import count, trials_of

from .conftest import FAKE, SPACES


def test_a_changed_kernel_gets_its_own_study_and_export_takes_it(storage: str, tmp_path,  # noqa: ANN001
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    opts = SearchOptions(trials=2, sampler="grid", storage=storage, space_dir=SPACES, retime=1, rounds=1)
    [old] = search([FAKE], "tiny", opts)
    old_hash = optuna.load_study(study_name=old.study, storage=storage).user_attrs["provenance"]["source_hash"]
    again = search([FAKE], "tiny", SearchOptions(**{**opts.__dict__, "trials": 3}))[0]
    assert again.study == old.study  # same kernels: resumed

    monkeypatch.setattr(Template, "source_hash", lambda self: "f" * 64)  # the kernels changed
    [new] = search([FAKE], "tiny", opts)
    assert new.study == f"{old.study}@{'f' * 12}"
    s_old = optuna.load_study(study_name=old.study, storage=storage)
    s_new = optuna.load_study(study_name=new.study, storage=storage)
    assert count(trials_of(s_old)).done == 3 and count(trials_of(s_new)).done == 2  # none reused, none lost
    assert s_old.user_attrs["provenance"]["source_hash"] == old_hash
    assert s_new.user_attrs["provenance"]["source_hash"] == "f" * 64
    assert s_new.user_attrs["shape_key"] == s_old.user_attrs["shape_key"] == old.study.split(":")[-1]
    # a third search of the same version resumes the versioned study
    [more] = search([FAKE], "tiny", SearchOptions(**{**opts.__dict__, "trials": 3}))
    assert more.study == new.study and more.trials == 3

    notes: list[str] = []
    lib = export_library(storage, tmp_path / "lib.json", note=notes.append)
    [entry] = lib["templates"]["fake"]["entries"]
    assert lib["templates"]["fake"]["source_hash"] == "f" * 64 and entry["trials"] == 3
    assert any(old.study in n and "older version" in n for n in notes), notes
    assert json.loads((tmp_path / "lib.json").read_text())["templates"]["fake"]["source_hash"] == "f" * 64


def test_export_takes_the_registered_templates_current_source_even_when_older_studies_are_newer() -> None:
    from types import SimpleNamespace

    from momtune.kernels import get_template
    from momtune.library import _current_versions

    now = get_template("norm").source_hash()

    def study(name: str, source: str, created: str) -> SimpleNamespace:
        return SimpleNamespace(study_name=name, user_attrs={
            "template": "norm", "shape_key": "N7-D24-float32", "dtype": "float32",
            "provenance": {"source_hash": source, "created": created}})

    current = study("norm:gpu:N7-D24-float32@" + now[:12], now, "2026-11-01")
    older = study("norm:gpu:N7-D24-float32", "0" * 16, "2026-11-20")  # re-run later, still old code
    other = study("norm:gpu:N9-D24-float32", "0" * 16, "2026-11-20")  # another shape: only version
    notes: list[str] = []
    other.user_attrs["shape_key"] = "N9-D24-float32"
    kept = _current_versions([older, current, other], notes.append)
    assert [s.study_name for s in kept] == [current.study_name, other.study_name]
    assert len(notes) == 1 and older.study_name in notes[0]
