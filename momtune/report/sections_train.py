"""The training-run section: what was trained, each run's numbers, whether it learnt, whether
momtune's loss curve agrees with the reference's within the stated bound, the speed-up, and the
loss curves — all as the file of ``bench/gpu_train_run.py --out`` records them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import plots
from .fmt import DASH, num, time_text
from .render import Bullets, Cell, Heading, Para, Table
from .trainrun import HOW, MOMTUNE, NUDGED, REFERENCE, TrainRun

if TYPE_CHECKING:
    from .analyze import Analysis
    from .doc import Doc

NOTES = ("final loss: the loss on the last step's batch (one batch of training data, so noisy); held-out "
         "recall: the share of recalled values the trained model predicts right on held-out batches; step: "
         "forward, backward and the AdamW step of the whole LM (CUDA events on a GPU); the first step includes "
         "compiling the kernels, the median leaves such outliers out; peak memory: "
         "torch.cuda.max_memory_allocated over the run (not recorded on the CPU).")


def training(doc: "Doc", a: "Analysis") -> None:
    doc.add(Heading("Training run", 2, "training-run"))
    runs = a.inputs.train_runs
    if not runs:
        doc.add(Para(f"No training run given (see Missing inputs): {HOW} records one; pass it with `--train-run`."))
        return
    for i, t in enumerate(runs):
        if len(runs) > 1:
            doc.add(Heading(t.path.name, 3))
        _one(doc, t, "train_run.png" if len(runs) == 1 else f"train_run_{i + 1}.png")


def _g(v: int | float | str | None) -> str:
    return "?" if v is None else f"{v:g}" if isinstance(v, (int, float)) else str(v)


def _pct(v: float | None) -> str:
    return DASH if v is None else f"{v:.1%}"


def what_was_trained(t: TrainRun) -> str:
    arg = t.arg
    pairs, keys, values = arg("pairs"), arg("keys"), arg("values")
    task = "multi-query associative recall"
    if isinstance(pairs, int):
        task += (f": each sequence stores {pairs} key-value pairs"
                 + (f" (keys from {keys}, values from {values} other tokens)" if keys and values else "")
                 + f", then asks for every key again in a shuffled order ({4 * pairs} tokens); the loss is the "
                 "cross-entropy of the recalled values")
    cfg: dict[str, Any] = t.data.get("config") if isinstance(t.data.get("config"), dict) else {}
    if cfg:
        model = (f"a MoM causal LM of {cfg.get('num_hidden_layers', '?')} layers, hidden size "
                 f"{cfg.get('hidden_size', '?')}, {cfg.get('num_heads', '?')} heads of {cfg.get('head_dim', '?')}, "
                 f"{cfg.get('num_memories', '?')} memories with top-{cfg.get('topk', '?')} routing"
                 + (" and a shared memory" if cfg.get("shared_mem") else "")
                 + f", vocabulary {cfg.get('vocab_size', '?')}")
    else:
        model = (f"a MoM causal LM of {arg('layers') or '?'} layers, hidden size {arg('hidden') or '?'} "
                 "(its config is not recorded)")
    steps = arg("steps") or len(t.runs[0].loss)
    train = (f"{steps} AdamW steps of {arg('batch') or '?'} sequences (learning rate {arg('lr') or '?'}, seed "
             f"{arg('seed') if arg('seed') is not None else '?'}), {t.dtype} on {t.device}")
    return (f"**What was trained:** {task}; {model}; {train}. Every run starts from the same initial weights "
            "and sees the same batches; the nudged reference starts from them moved by one float32 rounding, "
            "which shows how far two curves drift apart by rounding alone.")


def _learnt(t: TrainRun) -> str:
    need, unbound, chance = t.num("min_recall"), t.num("unbound_recall"), t.num("chance_recall")
    recalls = [r.accuracy for r in t.runs]
    base = []
    if chance is not None:
        base.append(f"chance is {_pct(chance)}" + (f" (loss {num(t.num('chance_loss'))})"
                                                   if t.num("chance_loss") is not None else ""))
    if unbound is not None:
        base.append(f"answering with a stored value without binding it to its key gives {_pct(unbound)}")
    baselines = (". " + base[0][0].upper() + "; ".join(base)[1:]) if base else ""
    shown = "; ".join(f"{r.label} {_pct(r.accuracy)}" for r in t.runs)
    if need is None:
        return f"**Learnt: not recorded** (no min_recall in the file) — held-out recall {shown}{baselines}."
    if need <= 0:
        return f"**Learnt: not checked** (min_recall 0: a CPU plumbing run) — held-out recall {shown}{baselines}."
    ok = all(r is not None and r >= need for r in recalls)
    said = t.data.get("learnt")
    text = (f"**Learnt: {'yes' if ok else 'NO'}** — {'every' if ok else 'not every'} run's held-out recall "
            f"reaches the {_pct(need)} the file requires (its min_recall): {shown}{baselines}.")
    if isinstance(said, bool) and said != ok:
        text += f" The file says learnt = {str(said).lower()}, which its own recalls contradict."
    return text


def _agree(t: TrainRun) -> str:
    factor, window = t.arg("factor"), t.arg("window")
    said = t.data.get("agree")
    checked = t.agree_checked
    if checked is None:
        if isinstance(said, bool):
            return (f"**Curves agree: {'yes' if said else 'NO'}** (as the file says; its per-step gaps and bounds "
                    "are not recorded).")
        return "**Curves agree: not recorded.**"
    n = len(t.data["gap"])
    how = (f"momtune's loss stays within {_g(factor)} × the nudged reference's drift "
           f"from the reference at every one of the {n} steps (per-step |loss difference|, the maximum over "
           f"{_g(window)} steps; at least float32's rounding of the loss)")
    text = f"**Curves agree: {'yes' if checked else 'NO'}** — {how}"
    tight = t.tightest
    if tight is not None:
        i, gap, bound = tight
        text += f"; {'tightest' if checked else 'worst'} at step {i}: {gap:.3g} against a bound of {bound:.3g}"
    largest = t.largest_gap
    if largest is not None and tight is not None and largest[0] != tight[0]:
        text += f"; the largest gap {largest[1]:.3g} at step {largest[0]} (bound there {largest[2]:.3g})"
    text += "."
    if isinstance(said, bool) and said != checked:
        text += f" The file says agree = {str(said).lower()}, which its own gaps and bounds contradict."
    return text


def speedup(t: TrainRun) -> float | None:
    """The reference's median step over momtune's (as the file's `speedup` records it)."""
    mt, ref = t.run(MOMTUNE), t.run(REFERENCE)
    if mt is None or ref is None or not mt.median_step_ms or not ref.median_step_ms:
        return t.num("speedup")
    return ref.median_step_ms / mt.median_step_ms


def _speed(t: TrainRun) -> str | None:
    mt, ref, speed = t.run(MOMTUNE), t.run(REFERENCE), speedup(t)
    if mt is None or ref is None or not mt.median_step_ms or not ref.median_step_ms or speed is None:
        return None
    text = (f"**Speed-up: {speed:.1f}×** — the reference's median training step ({time_text(ref.median_step_ms)}) "
            f"over momtune's ({time_text(mt.median_step_ms)})")
    if mt.peak_mem_mb and ref.peak_mem_mb:
        text += f"; peak memory {mt.peak_mem_mb:,.0f} MB against the reference's {ref.peak_mem_mb:,.0f} MB"
    return text + "."


def _one(doc: "Doc", t: TrainRun, png: str) -> None:
    doc.add(Para(f"As recorded in `{t.path.name}` by `bench/gpu_train_run.py` on {t.device} ({t.dtype}): the "
                 "numbers and curves below are the file's; nothing was re-run."))
    doc.add(Para(what_was_trained(t)))
    body: list[list[Cell | str]] = []
    for r in t.runs:
        body.append([Cell(r.label, "nw"), Cell(f"{r.final_loss:.4f}"), Cell(_pct(r.accuracy)),
                     Cell(num(r.median_step_ms)) if r.median_step_ms is not None else Cell(DASH, "muted"),
                     Cell(time_text(r.step_ms[0])) if r.step_ms else Cell(DASH, "muted"),
                     Cell(f"{r.peak_mem_mb:,.0f}") if r.peak_mem_mb is not None else Cell(DASH, "muted")])
    doc.add(Table(["run", "final loss", "held-out recall", "median step (ms)", "first step", "peak memory (MB)"],
                  "lrrrrr", body, notes=[NOTES]))
    doc.add(Bullets([s for s in (_learnt(t), _agree(t), _speed(t)) if s]))
    known = [n for n in (MOMTUNE, REFERENCE, NUDGED) if t.run(n)]
    caption = ("Loss per training step (log scale) of " + ", ".join(t.run(n).label for n in known)  # type: ignore[union-attr]
               + (", with the chance loss" if t.num("chance_loss") is not None else "") + ". ")
    if t.agree_checked is not None:
        caption += ("Below: momtune's distance from the reference, the nudged reference's drift from it, and "
                    "the bound the first must stay under (log scale). ")
    doc.figure(png, f"training run {t.path.name}: loss curves", caption + f"From `{t.path.name}`, as recorded.",
               lambda p: plots.loss_curves(p, t.data))


def summary_line(t: TrainRun) -> str:
    """One line for the CLI: learnt, agree, speed-up."""
    parts = [f"train run {t.path.name} ({t.device}, {t.dtype}):"]
    need = t.num("min_recall")
    recalls = [r.accuracy for r in t.runs]
    if need is not None and need > 0:
        parts.append("learnt " + ("yes" if all(r is not None and r >= need for r in recalls) else "NO") + ",")
    agree = t.agree_checked if t.agree_checked is not None else t.data.get("agree")
    if isinstance(agree, bool):
        parts.append(f"curves agree {'yes' if agree else 'NO'},")
    speed = speedup(t)
    if speed is not None:
        parts.append(f"speed-up {speed:.1f}x over the reference (median step)")
    return " ".join(parts).rstrip(",")
