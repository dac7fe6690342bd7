"""bench/gpu_train_run.py (issue 14, item 3): the associative-recall task and the run's plumbing on
the CPU in the interpreter (a few steps of a tiny LM, momtune's kernels against the reference)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_train_run.py"


def test_recall_batches_ask_every_stored_key_once() -> None:
    mod = load_script(SCRIPT)
    ids, labels = mod.recall_batch(3, 5, 8, 6, torch.Generator().manual_seed(1))
    assert ids.shape == labels.shape == (3, 20)
    for seq, lab in zip(ids.tolist(), labels.tolist()):
        store = dict(zip(seq[0:10:2], seq[1:10:2]))
        asked = seq[10::2]
        assert sorted(asked) == sorted(store) and all(k < 8 <= store[k] < 14 for k in store)
        # the label of each recalled value is that value, at its own position; nothing else counts
        assert [lab[i] for i in range(11, 20, 2)] == [store[k] for k in asked]
        assert all(lab[i] == -100 for i in range(20) if i < 11 or i % 2 == 0)
    again = mod.recall_batch(3, 5, 8, 6, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], ids)
    with pytest.raises(ValueError, match="pairs"):
        mod.recall_batch(1, 7, 8, 6, torch.Generator())


def test_nudged_moves_every_weight_by_about_one_unit() -> None:
    mod = load_script(SCRIPT)
    w = torch.randn(1000)
    moved = mod.nudged({"w": w, "n": torch.arange(3)}, seed=3)
    rel = ((moved["w"] - w) / w).abs()
    assert torch.equal(moved["n"], torch.arange(3))
    assert bool((rel > 0).all()) and float(rel.max()) <= 2 * torch.finfo(torch.float32).eps


def test_slow_decays_set_every_layers_A_and_nothing_else() -> None:
    import momtune

    mod = load_script(SCRIPT)
    torch.manual_seed(0)
    cfg = momtune.MoMConfig.from_preset("tiny", vocab_size=8, hidden_size=32, num_hidden_layers=2)
    state = momtune.reference.MoMForCausalLM(cfg).state_dict()
    slow = mod.slow_decays(state, 1.0)
    names = [k for k in state if k.endswith(".attn.A_log")]
    assert len(names) == 2 and all(bool((slow[k] == 0).all()) and bool((state[k] != 0).all()) for k in names)
    assert all(slow[k] is state[k] for k in state if k not in names)
    assert torch.allclose(mod.slow_decays(state, 2.0)[names[0]].exp(), torch.full((2,), 2.0))


def test_unbound_recall_is_a_stored_value_not_recalled_yet_at_random() -> None:
    mod = load_script(SCRIPT)
    assert mod.unbound_recall(1) == 1
    assert mod.unbound_recall(2) == pytest.approx((1 / 2 + 1) / 2)
    assert mod.unbound_recall(4) == pytest.approx((1 / 4 + 1 / 3 + 1 / 2 + 1) / 4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU run needs the interpreter")
def test_cpu_run_trains_both_and_compares_the_curves(tmp_path: Path) -> None:
    mod = load_script(SCRIPT)
    out = tmp_path / "t.json"
    rc = mod.main(["--device", "cpu", "--steps", "2", "--batch", "2", "--pairs", "3", "--keys", "6", "--values", "6",
                   "--hidden", "32", "--out", str(out), "--plot", str(tmp_path / "t.png")])
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"momtune", "reference", "reference, nudged init"}
    assert all(len(r["loss"]) == 2 and len(r["step_ms"]) == 2 for r in data["runs"].values())
    assert len(data["bound"]) == 2 and rc == (0 if data["agree"] else 1)
    assert data["agree"], (data["gap"], data["bound"])
    # on the CPU (plumbing) the recall is reported, not required
    assert data["min_recall"] == 0 and data["learnt"] and data["unbound_recall"] == pytest.approx(11 / 18)
    # where it ran, as `momtune bench` records it (momtune report --train-run shows it)
    assert data["provenance"]["gpu"] == "interpreter" and {"torch", "triton", "commit", "created"} <= set(data["provenance"])
    # the plot is the report's (momtune.report.plots.loss_curves)
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp*"))


def test_plot_is_the_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One plotting function: --plot draws with momtune.report.plots.loss_curves, through a temporary file."""
    import momtune.report.plots as plots

    mod = load_script(SCRIPT)
    seen = []
    monkeypatch.setattr(plots, "loss_curves", lambda path, result: (seen.append((path.name, result)),
                                                                    path.write_bytes(b"png")))
    result = {"runs": {}, "device": "cpu"}
    mod.plot(result, tmp_path / "t.png")
    assert seen == [("t.tmp.png", result)] and (tmp_path / "t.png").read_bytes() == b"png"
    assert not (tmp_path / "t.tmp.png").exists()
