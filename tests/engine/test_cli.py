"""The search / export / verify subcommands end to end on the fake templates (interpreter)."""
from __future__ import annotations

from pathlib import Path

import pytest

from momtune.cli import main
from momtune.library import load_library

from .conftest import FAKE, FAULTY, SPACES
from .fake_template import FAKE as FAKE_OBJ


def test_search_export_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    out = tmp_path / "out" / "library.json"
    # one trial: the winner is the default, so verify's verdict does not hang on interpreter timings
    # (a noise-made winner among equal configs could be judged slower on a loaded machine)
    assert main(["search", "--template", FAKE, "--shapes", "tiny", "--trials", "1", "--storage", url,
                 "--space-dir", SPACES, "--retime", "2", "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    assert "interpreter timings" in text and "fake:interpreter:N7-C9-float32" in text and "winner" in text
    assert main(["export", "--storage", url, "--out", str(out)]) == 0
    assert "1 entries of 1 templates for GPU 'interpreter'" in capsys.readouterr().out
    lib = load_library(out)
    assert lib.entries("fake")[0]["trials"] == 1
    assert main(["verify", str(out), "--policy", "strict", "--template-spec", f"fake={FAKE}"]) == 0
    text = capsys.readouterr().out
    assert "all 1 tuned configs pass their check and none is slower" in text and "N7 C9" in text


def _library(tmp_path: Path, config: dict, gpu: str = "interpreter") -> Path:
    import triton

    from momtune.library import SCHEMA, atomic_write_json

    from .fake_template import FAULTY as FAULTY_OBJ

    path = tmp_path / "lib.json"
    atomic_write_json(path, {"schema": SCHEMA, "provenance": {"gpu": gpu, "capability": None,
                                                             "triton": triton.__version__},
                             "templates": {"faulty": {"source_hash": FAULTY_OBJ.source_hash(), "spec": FAULTY,
                                                      "default_config": dict(FAULTY_OBJ.default_config),
                                                      "entries": [{"shape": {"N": 5, "C": 4}, "dtype": "float32",
                                                                   "config": config, "time_ms": 1.0}]}}})
    return path


def test_verify_fails_on_wrong_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _library(tmp_path, {"BLOCK": 32, "num_warps": 1, "FAULT": "wrong"})
    assert main(["verify", str(path), "--template-spec", f"faulty={FAULTY}"]) == 1
    text = capsys.readouterr().out
    assert "wrong_answer" in text and "1 of 1 tuned configs failed" in text


def test_verify_fails_when_the_tuned_config_is_slower_than_the_default(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = _library(tmp_path, {"BLOCK": 32, "num_warps": 1, "FAULT": "slow"})
    assert main(["verify", str(path), "--template-spec", f"faulty={FAULTY}"]) == 1
    text = capsys.readouterr().out
    assert "1 of 1 tuned configs are slower than the default beyond noise" in text and "(slower)" in text
    assert "failed their check" not in text and "±" in text


def test_judge_calls_a_difference_within_the_spread_noise():
    from momtune.commands.verify import judge

    assert judge(1.0, 1.5, 0.05, 0.05) == "faster"
    assert judge(1.5, 1.0, 0.05, 0.05) == "slower"
    assert judge(1.04, 1.0, 0.05, 0.01) == "within noise"  # 4% < the 5% spread
    assert judge(1.015, 1.0, 0.0, 0.0) == "within noise"  # under the 2% floor
    assert judge(1.10, 1.0, 0.0, 0.0) == "slower"


@pytest.mark.parametrize("policy,rc", [("strict", 2), ("warn", 0)])
def test_verify_provenance_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str, rc: int) -> None:
    path = _library(tmp_path, {"BLOCK": 32, "num_warps": 1, "FAULT": "none"}, gpu="NVIDIA H100 80GB HBM3")
    assert main(["verify", str(path), "--policy", policy, "--template-spec", f"faulty={FAULTY}"]) == rc
    captured = capsys.readouterr()
    assert "provenance mismatch: gpu: library 'NVIDIA H100 80GB HBM3', this machine 'interpreter'" in captured.out
    if policy == "strict":
        assert "policy strict" in captured.err
    else:  # the library's config is the default: timed twice, never judged slower than itself
        assert "the default)" in captured.out and "are slower than the default" not in captured.out


def test_search_exits_1_when_no_config_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (Path(SPACES) / "faulty.toml").read_text()
    text = text.replace('choices = ["none", "compile_error", "out_of_resources", "hang", "crash", "wrong", '
                        '"unwritten", "error"]\ndefault = "none"', 'choices = ["wrong", "error"]\ndefault = "wrong"')
    (tmp_path / "faulty.toml").write_text(text.replace('FAULT == \'none\' or ', ''))
    rc = main(["search", "--template", FAULTY, "--shapes", "tiny", "--trials", "5", "--storage",
               f"sqlite:///{tmp_path}/f.db", "--space-dir", str(tmp_path), "--sampler", "grid"])
    assert rc == 1
    assert "no config passed the check" in capsys.readouterr().out


def test_template_all_expands_to_registered_with_space(monkeypatch: pytest.MonkeyPatch) -> None:
    from momtune import templates
    from momtune.commands.search import template_specs

    monkeypatch.setattr(templates, "registered_names", lambda: ["fake", "ghost", "slow"])
    monkeypatch.setitem(templates._CACHE, "fake", FAKE_OBJ)
    monkeypatch.setitem(templates._CACHE, "slow", FAKE_OBJ)
    notes: list[str] = []
    assert template_specs(["all", "fake"], SPACES, notes.append) == ["fake", "slow"]
    assert notes == ["skipping template 'ghost': no search space ghost.toml"]


def test_export_missing_storage_is_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", "--storage", f"sqlite:///{tmp_path}/empty.db", "--out", str(tmp_path / "l.json")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "l.json").exists() and not (tmp_path / "empty.db").exists()


def test_a_library_never_imports_the_code_it_names(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared library naming a module (its 'spec') must not make verify import it (issue 15:
    a module in the working directory ran, and verify then said the configs pass)."""
    marker = tmp_path / "ran"
    (tmp_path / "planted_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\nFAKE = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _library(tmp_path, {"BLOCK": 32, "num_warps": 1, "FAULT": "none"})
    import json

    lib = json.loads(path.read_text())
    lib["templates"]["planted"] = {**lib["templates"].pop("faulty"), "spec": "planted_mod:FAKE"}
    path.write_text(json.dumps(lib))
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'planted': not a registered template" in err and "--template-spec planted=" in err, err
    assert not marker.exists()
    assert main(["verify", str(path), "--template-spec", "planted"]) == 2
    assert "expected NAME=MODULE:ATTR" in capsys.readouterr().err


def test_export_refuses_to_write_the_library_over_its_own_study_database(tmp_path: Path) -> None:
    from momtune.errors import InputError
    from momtune.library import export_library

    db = tmp_path / "x.db"
    db.write_bytes(b"not touched")
    with pytest.raises(InputError, match=r"^--out: .*is the study database"):
        export_library(f"sqlite:///{db}", tmp_path / "." / "x.db")
    assert db.read_bytes() == b"not touched"


def test_verify_with_nothing_to_check_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _library(tmp_path, {"BLOCK": 32, "num_warps": 1, "FAULT": "none"})
    assert main(["verify", str(path), "--template", "nosuch", "--template-spec", f"faulty={FAULTY}"]) == 1
    assert "no entries checked: the library has none for --template nosuch" in capsys.readouterr().out


def test_writing_json_to_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    from momtune.errors import LibraryError
    from momtune.library import atomic_write_json

    folder = tmp_path / "lib"
    folder.mkdir()
    with pytest.raises(LibraryError, match="lib: is a folder; give a file name"):
        atomic_write_json(folder, {})
    assert folder.is_dir() and not any(folder.iterdir())


def test_writing_json_where_one_cannot_is_a_clear_error(tmp_path: Path) -> None:
    from momtune.errors import LibraryError
    from momtune.library import atomic_write_json

    blocker = tmp_path / "file.txt"  # a file where the folder should be: fails even as root
    blocker.write_text("mine")
    with pytest.raises(LibraryError, match=r"file.txt/lib.json: cannot write here \("):
        atomic_write_json(blocker / "lib.json", {})
    assert blocker.read_text() == "mine"
