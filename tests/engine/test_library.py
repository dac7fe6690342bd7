"""Export from studies, load, atomic writes, and the several-GPU rule."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from momtune.errors import LibraryError, StorageError
from momtune.library import (
    SCHEMA,
    atomic_write_json,
    build_library,
    export_library,
    load_library,
)
from momtune.search import SearchOptions, search

from .conftest import FAKE, SPACES
from .fake_template import FAKE as FAKE_OBJ


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list]:
    url = f"sqlite:///{tmp_path_factory.mktemp('lib')}/s.db"
    results = search([FAKE], "two", SearchOptions(trials=3, storage=url, space_dir=SPACES, retime=2, rounds=1))
    return url, results


def test_export_load_round_trip(searched: tuple[str, list], tmp_path: Path) -> None:
    url, results = searched
    notes: list[str] = []
    out = tmp_path / "lib" / "library.json"
    lib = export_library(url, out, note=notes.append)
    assert notes == []
    loaded = load_library(out)
    assert json.loads(out.read_text())["schema"] == SCHEMA
    assert loaded.provenance == lib["provenance"]
    prov = loaded.provenance
    assert prov["gpu"] == "interpreter" and prov["triton"] and prov["torch"] and prov["momtune"] and prov["created"]
    assert set(prov) >= {"gpu", "capability", "sm_count", "driver", "cuda", "torch", "triton", "momtune", "created",
                         "commit"}
    tmpl = loaded.templates["fake"]
    assert tmpl["source_hash"] == FAKE_OBJ.source_hash()
    assert tmpl["default_config"] == {"BLOCK": 32, "num_warps": 1}
    assert tmpl["spec"] == FAKE
    entries = {(tuple(e["shape"].items()), e["dtype"]): e for e in loaded.entries("fake")}
    assert len(entries) == len(results) == 2
    for r in results:
        e = entries[(tuple(r.shape.items()), "float32")]
        assert e["config"] == r.winner and e["time_ms"] == pytest.approx(r.winner_ms)
        assert e["default_time_ms"] == pytest.approx(r.default_ms) and e["trials"] == r.trials
        assert e["study"] == r.study and e["max_abs_err"] < 1e-5 and e["max_rel_err"] < 1e-5
        assert e["retimed"] is True


def test_export_template_filter_and_missing(searched: tuple[str, list]) -> None:
    url, _ = searched
    assert build_library(url, templates=["fake"], note=lambda m: None)["templates"].keys() == {"fake"}
    with pytest.raises(StorageError, match="no momtune studies of templates recurrence"):
        build_library(url, templates=["recurrence"], note=lambda m: None)
    with pytest.raises(StorageError, match="with prefix 'tpe'"):
        build_library(url, prefix="tpe", note=lambda m: None)


def _fake_study(url: str, gpu: str, n: int, time_ms: float, prefix: str = "", default_ms: float | None = None,
                winner: dict | None = None) -> None:
    shape = {"N": n, "C": 3}
    name = f"{prefix}fake:{gpu.lower().replace(' ', '-')}:N{n}-C3-float32"
    study = optuna.create_study(study_name=name, storage=url, direction="minimize")
    for k, v in {"template": "fake", "shape": shape, "shape_key": f"N{n}-C3-float32", "dtype": "float32",
                 "gpu": gpu, "provenance": {"gpu": gpu, "triton": "3.6.0", "created": "2026-01-01T00:00:00",
                                            "source_hash": "abc"},
                 "default_config": {"BLOCK": 32}, "default_time_ms": default_ms or 2 * time_ms,
                 **({"winner": winner} if winner else {})}.items():
        study.set_user_attr(k, v)
    dist = {"BLOCK": CategoricalDistribution([16, 32])}
    for block, t in ((16, time_ms), (32, 2 * time_ms)):
        study.add_trial(optuna.trial.create_trial(
            params={"BLOCK": block}, distributions=dist, value=t,
            user_attrs={"status": "ok", "config": {"BLOCK": block}, "time_ms": t, "max_abs_err": 1e-6,
                        "max_rel_err": 1e-7}))
    study.add_trial(optuna.trial.create_trial(
        params={"BLOCK": 16}, distributions=dist, state=optuna.trial.TrialState.FAIL,
        user_attrs={"status": "timeout", "config": {"BLOCK": 16}}))


def test_several_gpus_warns_and_gpu_option_selects(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/gpus.db"
    _fake_study(url, "NVIDIA H100 80GB HBM3", 64, 0.5)
    _fake_study(url, "NVIDIA H100 80GB HBM3", 128, 0.7)
    _fake_study(url, "NVIDIA H200", 64, 0.4)
    _fake_study(url, "NVIDIA H200", 64, 0.1, prefix="exp/")  # prefixed: only with --study exp
    notes: list[str] = []
    lib = build_library(url, note=notes.append)
    assert lib["provenance"]["gpu"] == "NVIDIA H100 80GB HBM3"  # most studies (this machine has neither)
    assert len(notes) == 1 and "several GPUs" in notes[0] and "NVIDIA H200" in notes[0] and "--gpu" in notes[0]
    entries = lib["templates"]["fake"]["entries"]
    assert sorted(e["shape"]["N"] for e in entries) == [64, 128]
    e64 = next(e for e in entries if e["shape"]["N"] == 64)
    # no re-timed winner recorded: the best trial; trials counts recorded failures too
    assert e64["config"] == {"BLOCK": 16} and e64["time_ms"] == 0.5 and e64["retimed"] is False
    assert e64["trials"] == 3 and e64["default_time_ms"] == 1.0
    notes.clear()
    lib = build_library(url, gpu="NVIDIA H200", note=notes.append)
    assert [e["time_ms"] for e in lib["templates"]["fake"]["entries"]] == [0.4] and "several GPUs" in notes[0]
    assert build_library(url, prefix="exp", note=notes.append)["templates"]["fake"]["entries"][0]["time_ms"] == 0.1
    with pytest.raises(StorageError, match="GPUs in the storage"):
        build_library(url, gpu="NVIDIA A100", note=notes.append)
    # '*': every study of the GPU, the fastest per shape (the exp/ study beats the plain one)
    lib = build_library(url, gpu="NVIDIA H200", prefix="*", note=notes.append)
    [e] = lib["templates"]["fake"]["entries"]
    assert e["time_ms"] == 0.1 and e["study"].startswith("exp/")
    assert e["also_searched"] == ["fake:nvidia-h200:N64-C3-float32"] and e["default_time_ms"] == 0.2


def test_several_prefixes_keep_per_shape_the_larger_speed_up_over_each_study_s_own_default(tmp_path: Path) -> None:
    """Two studies of one shape ran in two processes (the H200's sampler comparison and its quick
    library search, session 10): each winner is compared with the default it was re-timed with,
    not with the other process's times."""
    url = f"sqlite:///{tmp_path}/two.db"
    win = {"config": {"BLOCK": 16}, "retimed": True, "spread": 0.0}
    _fake_study(url, "NVIDIA H200", 64, 0.40, prefix="quick/", default_ms=0.50, winner={**win, "time_ms": 0.40})
    _fake_study(url, "NVIDIA H200", 64, 0.38, prefix="exh/", default_ms=0.42, winner={**win, "time_ms": 0.38})
    _fake_study(url, "NVIDIA H200", 64, 0.01, prefix="other/")  # not asked for
    notes: list[str] = []
    [e] = build_library(url, prefix="quick,exh", note=notes.append)["templates"]["fake"]["entries"]
    assert e["study"].startswith("quick/") and e["time_ms"] == 0.40 and e["default_time_ms"] == 0.50  # 1.25x > 1.11x
    assert e["also_searched"] == ["exh/fake:nvidia-h200:N64-C3-float32"]
    [e] = build_library(url, prefix="exh", note=notes.append)["templates"]["fake"]["entries"]
    assert e["study"].startswith("exh/")


def test_a_reduced_space_s_config_is_written_out_with_the_template_defaults(tmp_path: Path) -> None:
    """bench/spaces' studies record only the parameters they searched; the kernel ran the rest at
    the template's defaults, and the library entry names them."""
    from momtune.templates import resolve_template

    url = f"sqlite:///{tmp_path}/reduced.db"
    study = optuna.create_study(study_name="exhaustive/norm:nvidia-h200:N64-D32-residual1-float32", storage=url)
    shape = {"N": 64, "D": 32, "residual": 1}
    for k, v in {"template": "norm", "shape": shape, "shape_key": "N64-D32-residual1-float32", "dtype": "float32",
                 "gpu": "NVIDIA H200", "provenance": {"gpu": "NVIDIA H200", "triton": "3.6.0",
                                                      "created": "2026-01-01T00:00:00",
                                                      "source_hash": resolve_template("norm").source_hash()},
                 "default_config": {"BLOCK_N": 1}, "default_time_ms": 1.0}.items():
        study.set_user_attr(k, v)
    study.add_trial(optuna.trial.create_trial(
        params={"BLOCK_N": 2}, distributions={"BLOCK_N": CategoricalDistribution([1, 2])}, value=0.5,
        user_attrs={"status": "ok", "config": {"BLOCK_N": 2}, "time_ms": 0.5}))
    [e] = build_library(url, prefix="exhaustive", note=lambda m: None)["templates"]["norm"]["entries"]
    full = resolve_template("norm").default_for("float32")
    assert e["config"] == {**full, "BLOCK_N": 2} and set(e["config"]) == set(full)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "library.json"
    atomic_write_json(path, {"schema": SCHEMA, "v": 1})
    old = path.read_text()

    def broken_dump(obj, f, **kw):  # type: ignore[no-untyped-def]
        f.write('{"schema": "momtune.lib')  # a partial write, then the process is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"schema": SCHEMA, "v": 2})
    assert path.read_text() == old
    assert [p.name for p in tmp_path.iterdir()] == ["library.json"]  # no temp file left


def test_atomic_write_non_finite_becomes_null(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "x.json", {"a": float("inf"), "b": [float("nan"), 1.5]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5]}


BROKEN = [
    ("missing-file", None, "file not found"),
    ("not-json", "{not json", "not readable JSON"),
    ("wrong-schema", json.dumps({"schema": "momtune.library/0", "provenance": {}, "templates": {}}), "schema"),
    ("not-object", "[]", "schema"),
    ("bad-entry", json.dumps({"schema": SCHEMA, "provenance": {}, "templates": {"fake": {"entries": [{"shape": 1}]}}}),
     "templates.fake.entries[0]"),
]


@pytest.mark.parametrize("text,msg", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_load_broken_library_names_file(tmp_path: Path, text: str | None, msg: str) -> None:
    path = tmp_path / "lib.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(LibraryError) as err:
        load_library(path)
    assert str(path) in str(err.value) and msg in str(err.value)


def test_atomic_write_gives_a_shareable_mode_and_keeps_an_existing_one(tmp_path):
    """mkstemp makes 0600 files: a library written through it could not be read by another user,
    and re-exporting made a readable library private (issue 15)."""
    import os
    import stat

    from momtune.library import atomic_write_json

    old = os.umask(0o022)
    try:
        path = tmp_path / "lib.json"
        atomic_write_json(path, {"a": 1})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o640)
        atomic_write_json(path, {"a": 2})
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)


# ---- a library is data: verify checks every field it relies on (issue 15)


def _edited(searched: tuple[str, list], tmp_path: Path, edit) -> str:  # type: ignore[no-untyped-def]
    url, _ = searched
    path = tmp_path / "lib.json"
    export_library(url, path, note=lambda m: None)
    lib = json.loads(path.read_text())
    edit(lib)
    path.write_text(json.dumps(lib))
    return str(path)


@pytest.mark.parametrize("field", ["source_hash", "triton", "driver", "created"])
def test_verify_strict_names_a_missing_provenance_field(searched: tuple[str, list], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], field: str) -> None:
    from momtune.cli import main

    def drop(lib: dict) -> None:
        (lib["templates"]["fake"] if field == "source_hash" else lib["provenance"]).pop(field)

    path = _edited(searched, tmp_path, drop)
    assert main(["verify", path, "--policy", "strict", "--template-spec", f"fake={FAKE}"]) == 2
    err = capsys.readouterr().err
    assert f"{field} missing" in err and "policy strict" in err and "Traceback" not in err


def test_verify_refuses_configs_outside_the_search_space(searched: tuple[str, list], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """BLOCK=256 runs right (so verify passed it), but it was never searched: refused without running."""
    from momtune.cli import main
    from momtune.commands.verify import verify

    def edit(lib: dict) -> None:
        a, b = lib["templates"]["fake"]["entries"]
        a["config"] = {**a["config"], "BLOCK": 256}
        b["config"] = {**b["config"], "num_wraps": 2}  # a mistyped parameter

    path = _edited(searched, tmp_path, edit)
    assert json.loads(Path(path).read_text())["templates"]["fake"]["choices"]["BLOCK"] == [16, 32, 64, 128]
    notes: list[str] = []
    rows = verify(path, "warn", None, None, 1, note=notes.append, allowed={"fake": FAKE}, space_dir=SPACES)
    assert [r["status"] for r in rows] == ["invalid_config"] * 2 and notes == []
    assert "spaces/fake.toml: BLOCK=256 is not one of [16, 32, 64, 128]" in rows[0]["reason"]
    assert "unknown parameters ['num_wraps']" in rows[1]["reason"]
    # without the space file: the template's parameters and the choices the library records
    rows = verify(path, "warn", None, None, 1, note=notes.append, allowed={"fake": FAKE})
    assert "BLOCK=256 is not one of [16, 32, 64, 128], the choices the library records" in rows[0]["reason"]
    assert "['num_wraps'] are not the template's" in rows[1]["reason"] and "--space-dir" in notes[0]
    assert main(["verify", path, "--template-spec", f"fake={FAKE}", "--space-dir", SPACES]) == 1
    out = capsys.readouterr().out
    assert "2 of 2 tuned configs failed their check" in out and "invalid_config" in out and "BLOCK=256" in out


def test_verify_reports_unknown_fields(searched: tuple[str, list], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from momtune.cli import main
    from momtune.commands.verify import verify

    path = _edited(searched, tmp_path, lambda lib: lib["templates"]["fake"]["entries"][0].update(confg={"BLOCK": 32}))
    assert main(["verify", path, "--policy", "strict", "--template-spec", f"fake={FAKE}"]) == 2
    assert "templates.fake.entries[0].confg: unknown field (known: shape, dtype, config" in capsys.readouterr().err
    notes: list[str] = []
    assert verify(path, "warn", ["none"], None, 1, note=notes.append, allowed={"fake": FAKE}) == []
    assert [n for n in notes if "confg: unknown field" in n and n.startswith("warning: ")]


def test_verify_a_template_filter_matching_nothing_says_what_the_library_holds(
        searched: tuple[str, list], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from momtune.cli import main

    path = _edited(searched, tmp_path, lambda lib: None)
    assert main(["verify", path, "--template", "recurence", "--template-spec", f"fake={FAKE}"]) == 1
    assert "the library has none for --template recurence (it holds fake (2 entries))" in capsys.readouterr().out
    path = _edited(searched, tmp_path, lambda lib: lib["templates"].clear())
    assert main(["verify", path]) == 1
    assert "the library has none (it holds no templates)" in capsys.readouterr().out


def test_load_reports_unknown_fields_at_every_level(tmp_path: Path) -> None:
    path = tmp_path / "lib.json"
    path.write_text(json.dumps({"schema": SCHEMA, "note": 1, "provenance": {"gpu": "x", "trition": "3"},
                                "templates": {"fake": {"entries": [], "sorce_hash": "a"}}}))
    assert [u.split(":")[0] for u in load_library(path).unknown] == ["note", "provenance.trition",
                                                                      "templates.fake.sorce_hash"]


@pytest.mark.parametrize(("winner_ms", "kept"), [(1.03, True), (1.01, True), (0.9, False)],
                         ids=["slower", "within-noise", "faster"])
def test_export_ships_the_default_for_a_winner_not_faster_than_it(tmp_path: Path, winner_ms: float, kept: bool) -> None:
    """A study named before the winner had to beat a default without a result of its own (H200,
    session 9: decode B128's winner re-timed 3% slower than the default and was exported): the
    library holds the default, with the winner that lost under ``default_kept``; a nearest-shape
    lookup then lends the default, not the loser."""
    url = f"sqlite:///{tmp_path}/kept.db"
    _fake_study(url, "NVIDIA H200", 64, 0.5)
    study = optuna.load_study(study_name="fake:nvidia-h200:N64-C3-float32", storage=url)
    study.set_user_attr("default_time_ms", 1.0)
    study.set_user_attr("default_valid", True)
    study.set_user_attr("winner", {"config": {"BLOCK": 16}, "time_ms": winner_ms, "spread": 0.001, "retimed": True,
                                   "trials": 3, "default_kept": None,
                                   "candidates": [{"config": {"BLOCK": 16}, "time_ms": winner_ms, "spread": 0.001}]})
    [e] = build_library(url, note=lambda m: None)["templates"]["fake"]["entries"]
    if kept:
        assert e["config"] == {"BLOCK": 32} and e["time_ms"] == 1.0 and e["default_time_ms"] == 1.0
        assert e["default_kept"] == {"config": {"BLOCK": 16}, "time_ms": winner_ms, "spread": 0.001}
        assert e["max_rel_err"] == 1e-7  # the default's own trial's error, not the loser's
    else:
        assert e["config"] == {"BLOCK": 16} and e["time_ms"] == 0.9 and "default_kept" not in e
    # a default outside the space for this shape, or with a recorded failure, is never shipped instead
    study.set_user_attr("default_valid", False)
    [e] = build_library(url, note=lambda m: None)["templates"]["fake"]["entries"]
    assert e["config"] == {"BLOCK": 16} and "default_kept" not in e
    study.set_user_attr("default_valid", True)
    study.add_trial(optuna.trial.create_trial(
        params={"BLOCK": 32}, distributions={"BLOCK": CategoricalDistribution([16, 32])},
        state=optuna.trial.TrialState.FAIL, user_attrs={"status": "wrong", "config": {"BLOCK": 32}}))
    [e] = build_library(url, note=lambda m: None)["templates"]["fake"]["entries"]
    assert e["config"] == {"BLOCK": 16} and "default_kept" not in e


def test_export_merge_keeps_the_other_templates_with_their_provenance(searched: tuple[str, list],
                                                                        tmp_path: Path) -> None:
    """``export --merge``: a library grown a template at a time (session 13 tuned the H200's
    backward templates into a library whose forward templates came from studies of session 9): the
    file's templates this export lacks are kept, each with the provenance it was tuned with; a
    template both hold is the export's; another GPU's file is refused and left as it was."""
    from momtune.errors import InputError

    url, _ = searched
    out = tmp_path / "library.json"
    lib = build_library(url, note=lambda m: None)
    earlier = {**lib["provenance"], "created": "2026-11-29T15:22:36+00:00", "commit": "2eaa807"}
    other = {"source_hash": "x", "default_config": {"B": 1}, "entries": [
        {"shape": {"N": 4}, "dtype": "float32", "config": {"B": 2}, "time_ms": 1.0, "default_time_ms": 2.0}]}
    stale_fake = {**lib["templates"]["fake"], "entries": lib["templates"]["fake"]["entries"][:1]}
    atomic_write_json(out, {"schema": SCHEMA, "provenance": earlier, "templates": {"other": other, "fake": stale_fake}})
    with pytest.raises(InputError, match="other"):  # without --merge: it would lose "other"
        export_library(url, out, note=lambda m: None)
    notes: list[str] = []
    merged = export_library(url, out, note=notes.append, merge=True)
    loaded = load_library(out)
    assert loaded.unknown == [] and set(loaded.templates) == {"fake", "other"}
    assert loaded.templates["other"]["entries"] == other["entries"]
    assert loaded.templates["other"]["provenance"] == earlier  # where it was tuned, not this export's
    assert loaded.provenance == merged["provenance"] == lib["provenance"] | {"created": merged["provenance"]["created"]}
    assert len(loaded.entries("fake")) == 2 and "provenance" not in loaded.templates["fake"]
    assert not any("provenance" in e for e in loaded.entries("fake"))  # the old entry was not faster: not kept
    assert any("fake: 2 entries exported, 0 of" in n for n in notes)
    # merged again: "other" keeps its own provenance, not the file's newer one
    export_library(url, out, note=lambda m: None, merge=True)
    assert load_library(out).templates["other"]["provenance"] == earlier
    # of a template both hold: an old entry of a shape the export lacks, and one faster over its own
    # default than the export's of its shape, are kept (with where they were tuned); the rest is the
    # export's (session 13: head-128 recurrence entries must not drop the mom-340m ones)
    fresh = lib["templates"]["fake"]["entries"]
    elsewhere = {**fresh[0], "shape": {"N": 999, "C": 3}, "config": {"BLOCK": 64, "num_warps": 1}}
    better = {**fresh[1], "time_ms": fresh[1]["default_time_ms"] / 10, "config": {"BLOCK": 128, "num_warps": 1}}
    atomic_write_json(out, {"schema": SCHEMA, "provenance": earlier,
                            "templates": {"fake": {**lib["templates"]["fake"], "entries": [elsewhere, better]}}})
    notes.clear()
    export_library(url, out, note=notes.append, merge=True)
    got = {json.dumps(e["shape"], sort_keys=True): e for e in load_library(out).entries("fake")}
    assert len(got) == 3
    assert got['{"C": 3, "N": 999}']["provenance"] == earlier and got['{"C": 3, "N": 999}']["config"]["BLOCK"] == 64
    kept = got[json.dumps(better["shape"], sort_keys=True)]
    assert kept["config"]["BLOCK"] == 128 and kept["provenance"] == earlier
    other_shape = next(e for k, e in got.items() if k not in ('{"C": 3, "N": 999}', json.dumps(better["shape"],
                                                                                             sort_keys=True)))
    assert "provenance" not in other_shape  # the export's own
    assert any("2 of" in n and "kept" in n for n in notes)
    # the template's source changed since: the old entries go (said)
    atomic_write_json(out, {"schema": SCHEMA, "provenance": earlier, "templates": {
        "fake": {**lib["templates"]["fake"], "source_hash": "0000", "entries": [elsewhere]}}})
    notes.clear()
    export_library(url, out, note=notes.append, merge=True)
    assert len(load_library(out).entries("fake")) == 2 and any("source changed" in n for n in notes)
    # another GPU's library is not merged into, and stays as it was
    before = out.read_text()
    data = json.loads(before)
    data["provenance"]["gpu"] = "NVIDIA H200"
    atomic_write_json(out, data)
    before = out.read_text()
    with pytest.raises(InputError, match="--merge.*NVIDIA H200"):
        export_library(url, out, note=lambda m: None, merge=True)
    assert out.read_text() == before


def test_export_ships_a_default_whose_trials_ran_out_of_device_memory_when_the_retiming_ran_it(tmp_path: Path) -> None:
    """H200 session 13: the recurrence backward's default at N 196,608 ran out of the device's
    memory in both its attempts (16 compile workers held it), was re-timed at 28.55 ms, and a
    winner at 31.8 ms was named and exported (0.90x). Running out of memory is the device's state
    at the time: the default the re-timing ran is shipped; any other failure of it still is not."""
    url = f"sqlite:///{tmp_path}/oom.db"
    _fake_study(url, "NVIDIA H200", 64, 0.5)
    study = optuna.load_study(study_name="fake:nvidia-h200:N64-C3-float32", storage=url)
    study.set_user_attr("default_time_ms", 1.0)
    study.set_user_attr("default_valid", True)
    study.set_user_attr("winner", {"config": {"BLOCK": 16}, "time_ms": 1.11, "spread": 0.01, "retimed": True,
                                   "trials": 3, "default_kept": None,
                                   "candidates": [{"config": {"BLOCK": 16}, "time_ms": 1.11, "spread": 0.01}]})
    failed = dict(params={"BLOCK": 32}, distributions={"BLOCK": CategoricalDistribution([16, 32])},
                  state=optuna.trial.TrialState.FAIL)
    study.add_trial(optuna.trial.create_trial(**failed, user_attrs={"status": "out_of_memory", "attempts": 2,
                                                                      "config": {"BLOCK": 32}}))
    [e] = build_library(url, note=lambda m: None)["templates"]["fake"]["entries"]
    assert e["config"] == {"BLOCK": 32} and e["time_ms"] == 1.0
    assert e["default_kept"] == {"config": {"BLOCK": 16}, "time_ms": 1.11, "spread": 0.01}
    study.add_trial(optuna.trial.create_trial(**failed, user_attrs={"status": "illegal_memory", "attempts": 2,
                                                                      "config": {"BLOCK": 32}}))
    [e] = build_library(url, note=lambda m: None)["templates"]["fake"]["entries"]
    assert e["config"] == {"BLOCK": 16} and "default_kept" not in e
