"""The training-run section (`momtune report --train-run FILE`, the JSON of bench/gpu_train_run.py):
its numbers as the file records them, the verdicts checked against the file's own numbers, the
loss-curve figure, provenance, bad files and the missing-input hint."""
from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from momtune.errors import ReportError
from momtune.report import build_report

from .conftest import PROV_NEW, Stored

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
H200_RUN = Path(__file__).resolve().parents[2] / "docs" / "perf" / "2026-11-29-h200-s13-call2-train-run.json"
HOW = "`python3 bench/gpu_train_run.py --steps 300 --out train-run.json --plot train-run.png` on a GPU"

# as bench/gpu_train_run.py writes it (its args as strings), four steps, made-up numbers
RUN: dict[str, Any] = {
    "device": "NVIDIA H200", "dtype": "float32",
    "args": {"steps": "4", "batch": "8", "pairs": "4", "keys": "16", "values": "16", "hidden": "128",
             "layers": "2", "lr": "0.003", "factor": "4.0", "window": "10", "min_recall": "None", "seed": "0",
             "device": "cuda", "out": "/root/out/t.json"},
    "config": {"vocab_size": 32, "hidden_size": 128, "num_hidden_layers": 2, "num_heads": 2, "head_dim": 64,
               "num_memories": 4, "topk": 2, "shared_mem": True},
    "chance_loss": 2.772588722239781, "chance_recall": 0.0625, "unbound_recall": 0.5208333333333334,
    "min_recall": 0.75, "learnt": True,
    "runs": {
        "momtune": {"loss": [3.0, 2.0, 1.0, 0.5], "step_ms": [5000.0, 10.0, 12.0, 11.0], "accuracy": 0.9,
                    "median_step_ms": 11.0, "peak_mem_mb": 100.0},
        "reference": {"loss": [3.0, 2.1, 1.1, 0.6], "step_ms": [300.0, 100.0, 120.0, 110.0], "accuracy": 0.95,
                      "median_step_ms": 110.0, "peak_mem_mb": 250.0},
        "reference, nudged init": {"loss": [3.0, 2.2, 1.2, 0.4], "step_ms": [290.0, 101.0, 121.0, 105.0],
                                   "accuracy": 0.8125, "median_step_ms": 105.0, "peak_mem_mb": 249.0}},
    "drift": [0.0, 0.2, 0.2, 0.2], "gap": [0.0, 0.1, 0.1, 0.1], "bound": [1e-6, 0.8, 0.8, 0.8],
    "agree": True, "speedup": 10.0}


def write_run(path: Path, **changes: Any) -> Path:
    data = copy.deepcopy(RUN)
    data.update(changes)
    path.write_text(json.dumps(data, indent=1))
    return path


def _section(out: Path, name: str) -> str:
    md = (out / "report.md").read_text(encoding="utf-8")
    assert f"## {name}" in md
    return md.split(f"## {name}")[1].split("\n## ")[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    out = root / "report"
    build_report(out, storage=None, train_runs=[write_run(root / "t.json")])
    return out


def test_section_shows_the_recorded_numbers(built: Path) -> None:
    sec = _section(built, "Training run")
    assert "As recorded in `t.json` by `bench/gpu_train_run.py` on NVIDIA H200 (float32)" in sec
    assert "nothing was re-run" in sec
    assert "each sequence stores 4 key-value pairs (keys from 16, values from 16 other tokens)" in sec
    assert ("a MoM causal LM of 2 layers, hidden size 128, 2 heads of 64, 4 memories with top-2 routing and a "
            "shared memory, vocabulary 32; 4 AdamW steps of 8 sequences (learning rate 0.003, seed 0), float32 on "
            "NVIDIA H200") in sec
    # final loss (the last step's), held-out recall, median step, first step (compiling), peak memory
    assert "| momtune kernels | 0.5000 | 90.0% | 11.0 | 5.00 s | 100 |" in sec
    assert "| PyTorch reference | 0.6000 | 95.0% | 110 | 300 ms | 250 |" in sec
    assert "| PyTorch reference (nudged init) | 0.4000 | 81.2% | 105 | 290 ms | 249 |" in sec
    assert "**Learnt: yes** — every run's held-out recall reaches the 75.0% the file requires" in sec
    assert "Chance is 6.2% (loss 2.77); answering with a stored value without binding it to its key gives 52.1%" in sec
    assert ("**Curves agree: yes** — momtune's loss stays within 4 × the nudged reference's drift from the "
            "reference at every one of the 4 steps") in sec
    # nearest its bound at step 0 (the floor of float32's rounding); furthest from the reference at step 1
    assert "tightest at step 0: 0 against a bound of 1e-06; the largest gap 0.1 at step 1 (bound there 0.8)." in sec
    assert ("**Speed-up: 10.0×** — the reference's median training step (110 ms) over momtune's (11.0 ms); "
            "peak memory 100 MB against the reference's 250 MB.") in sec
    assert "contradict" not in sec
    md = (built / "report.md").read_text(encoding="utf-8")
    assert "training run `t.json`" in md.split("\n")[2]  # the subtitle names it
    assert md.startswith("# momtune report — NVIDIA H200")
    assert "**training run**" not in md  # given: not a missing input


def test_figure_written_and_embedded(built: Path) -> None:
    png = (built / "train_run.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 20_000
    assert "![training run t.json: loss curves](train_run.png)" in _section(built, "Training run")
    html = (built / "report.html").read_text(encoding="utf-8")
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"' in html
    assert '<h2 id="training-run">Training run</h2>' in html and 'href="#training-run"' in html
    assert "train_run.png" in json.loads((built / "momtune-report.json").read_text())["files"]


def test_provenance_column(built: Path, tmp_path: Path) -> None:
    prov = _section(built, "Provenance")
    header = next(line for line in prov.splitlines() if line.startswith("|  |"))
    assert header == "|  | training run t.json |"
    assert "| GPU | NVIDIA H200 |" in prov and "| dtype | float32 |" in prov
    # the committed runs predate the provenance: said so, not guessed
    for row in ("commit", "created", "torch", "momtune ran with"):
        assert f"| {row} | not recorded |" in prov
    # a newer file records it as momtune bench does
    path = write_run(tmp_path / "new.json", provenance={**PROV_NEW, "gpu": "NVIDIA H200", "momtune_library": None})
    build_report(tmp_path / "r", storage=None, train_runs=[path])
    prov = _section(tmp_path / "r", "Provenance")
    assert "| commit | abc123def456 |" in prov and "| created | 2025-01-02 03:04 |" in prov
    assert "| torch | 2.6.0 |" in prov and "| momtune ran with | each template's default config" in prov


def test_verdicts_are_checked_against_the_files_numbers(tmp_path: Path) -> None:
    """A run that did not learn and a curve that leaves its bound say NO, whatever the file's flags say."""
    runs = copy.deepcopy(RUN["runs"])
    runs["momtune"]["accuracy"] = 0.5
    path = write_run(tmp_path / "bad.json", runs=runs, gap=[0.0, 0.1, 0.9, 0.1])
    build_report(tmp_path / "r", storage=None, train_runs=[path])
    sec = _section(tmp_path / "r", "Training run")
    assert "**Learnt: NO** — not every run's held-out recall reaches the 75.0%" in sec
    assert "momtune kernels 50.0%" in sec
    assert "**Curves agree: NO**" in sec and "worst at step 2: 0.9 against a bound of 0.8" in sec
    assert "The file says learnt = true, which its own recalls contradict." in sec
    assert "The file says agree = true, which its own gaps and bounds contradict." in sec


def test_cpu_run_is_not_checked_and_gets_the_interpreter_banner(tmp_path: Path) -> None:
    runs = {k: {**v, "peak_mem_mb": None} for k, v in RUN["runs"].items()}
    path = write_run(tmp_path / "cpu.json", device="cpu (interpreter)", min_recall=0.0, runs=runs)
    build_report(tmp_path / "r", storage=None, train_runs=[path])
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "interpreter timings — not GPU performance" in md.split("## Provenance")[0]
    sec = _section(tmp_path / "r", "Training run")
    assert "**Learnt: not checked** (min_recall 0: a CPU plumbing run)" in sec
    assert "| momtune kernels | 0.5000 | 90.0% | 11.0 | 5.00 s | — |" in sec
    assert "peak memory 100 MB" not in sec


def test_committed_h200_run() -> None:
    from momtune.report.sections_train import summary_line, what_was_trained
    from momtune.report.trainrun import load_train_run

    t = load_train_run(H200_RUN)
    assert [r.label for r in t.runs] == ["momtune kernels", "PyTorch reference", "PyTorch reference (nudged init)"]
    assert [round(r.accuracy or 0, 4) for r in t.runs] == [0.9883, 0.9961, 0.998]
    assert t.agree_checked is True and t.data["agree"] is True
    assert "300 AdamW steps of 32 sequences" in what_was_trained(t)
    assert summary_line(t) == ("train run 2026-11-29-h200-s13-call2-train-run.json (NVIDIA H200, float32): learnt yes, "
                               "curves agree yes, speed-up 13.5x over the reference (median step)")


def test_without_train_run_the_missing_inputs_say_how(stored: Stored, tmp_path: Path) -> None:
    out = tmp_path / "r"
    build_report(out, storage=None, benches=[stored.bench])
    missing = _section(out, "Missing inputs")
    assert "**training run** — no loss curves of a real training run" in missing
    assert f"Get it with {HOW}, then pass `--train-run train-run.json`." in missing
    assert "No training run given (see Missing inputs)" in _section(out, "Training run")
    assert not list(out.glob("train_run*.png"))


@pytest.mark.parametrize("case,why", [
    ("nonexistent", "no such file"),
    ("not-json", "not readable JSON"),
    ("bench-file", "this is a bench file .*pass it with --bench"),
    ("no-runs", "no `runs` object of named runs; expected the JSON that bench/gpu_train_run.py --out writes"),
    ("bad-loss", r"runs\['momtune'\]: `loss` must be a non-empty list of numbers"),
    ("bad-accuracy", r"runs\['reference'\]: `accuracy` must be a number or null, got 'high'"),
    ("bad-gap", "`gap` must be a list of numbers"),
])
def test_bad_train_run_file_names_the_file_and_the_problem(tmp_path: Path, case: str, why: str) -> None:
    path = tmp_path / f"{case}.json"
    runs = copy.deepcopy(RUN["runs"])
    if case == "not-json":
        path.write_text("{not json")
    elif case == "bench-file":
        path.write_text(json.dumps({"schema": "momtune.bench/1", "rows": []}))
    elif case == "no-runs":
        write_run(path, runs={})
    elif case == "bad-loss":
        runs["momtune"]["loss"] = "3.0"
        write_run(path, runs=runs)
    elif case == "bad-accuracy":
        runs["reference"]["accuracy"] = "high"
        write_run(path, runs=runs)
    elif case == "bad-gap":
        write_run(path, gap=[0.1, "x"])
    with pytest.raises(ReportError, match=rf"train-run file {str(path).replace('.', '[.]')}: {why}"):
        build_report(tmp_path / "r", storage=None, train_runs=[path])
    assert not (tmp_path / "r").exists()


def test_cli_takes_train_run_and_reports_a_bad_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from momtune.cli import main

    monkeypatch.chdir(tmp_path)  # the default storage (sqlite:///momtune.db) is not there
    monkeypatch.delenv("MOMTUNE_STORAGE", raising=False)

    bad = tmp_path / "b.json"
    bad.write_text("[]")
    assert main(["report", "--train-run", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "b.json: expected a JSON object, got list" in capsys.readouterr().err
    good = write_run(tmp_path / "t.json")
    assert main(["report", "--train-run", str(good), "--out", str(tmp_path / "r")]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the console's width
    assert "learnt yes" in out and "curves agree yes" in out and "speed-up 10.0x" in out
    assert (tmp_path / "r" / "train_run.png").is_file()
    # --out may not hold an input: the report replaces its whole folder
    inside = write_run(tmp_path / "r" / "t.json")
    assert main(["report", "--train-run", str(inside), "--out", str(tmp_path / "r")]) == 2
    assert "holds --train-run" in capsys.readouterr().err
