"""fla's MomForCausalLM made fast with one call, driven by Hugging Face ``generate`` (issue 13).

On a CUDA GPU: an fla 0.6.0 ``MomForCausalLM`` (mom-340m layer shapes, ``--layers`` layers,
random init, ``--dtype``) is copied and ``momtune.apply``'d. fla's greedy tokens (its forward on
its own cache, step by step; B ``--batch``, prompts of ``--prompt`` tokens, ``--new`` new ones,
compared up to EOS) against the applied model's through transformers' ``generate``: in float32
they must be equal; a split is reported with the float64 reference's margin between the two
tokens there (a near-tie is a property of the weights, not a kernel error). Whether fla itself
gives the same tokens through ``generate`` is reported too (fla 0.6.0 ignores the cache that
transformers 5 passes as ``cache=``).
Then time per token at B 1, eager, both models through the same greedy loop on their cache
(prefill taken out), warmed until two medians of 5 runs agree within 3%; spreads reported.

    python3 bench/gpu_apply_demo.py --out demo.json          # float32, 4 layers
    python3 bench/gpu_apply_demo.py --dtype bfloat16 --layers 8 --budget 30

Prints a short table; ``--out`` writes every number as JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def fla_model(layers: int, dtype: torch.dtype, seed: int) -> Any:
    import fla.models as fla_models

    cfg = fla_models.MomConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=layers, num_heads=4, head_dim=256,
                               expand_v=1, num_memories=4, topk=2, shared_mem=True, hidden_ratio=3)
    torch.manual_seed(seed)
    return fla_models.MomForCausalLM(cfg).to("cuda", dtype).eval()


def hf_greedy(model: Any, ids: torch.Tensor, new: int) -> torch.Tensor:
    """transformers' greedy ``generate`` (a row stops at EOS, padded with 0 after it)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             use_cache=True, pad_token_id=0)
    got = out[:, ids.shape[1]:]
    if got.shape[1] < new:
        got = torch.cat([got, got.new_zeros(got.shape[0], new - got.shape[1])], 1)
    return got


def loop(model: Any, ids: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens on the model's own cache passed back each step (prefill, then one token at
    a time): fla's greedy decoding without transformers' generate."""
    toks = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        for _ in range(n):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok)
            if len(toks) == n:
                break
            out = model(tok, past_key_values=cache, use_cache=True)
    return torch.cat(toks, 1) if toks else ids.new_zeros(ids.shape[0], 0)


def upto_eos(toks: torch.Tensor, eos: int | None) -> list[int]:
    """Per row, the number of tokens up to and including the first EOS (generate stops there)."""
    n = toks.shape[1]
    if eos is None:
        return [n] * toks.shape[0]
    out = []
    for row in toks:
        hit = (row == eos).nonzero()
        out.append(int(hit[0]) + 1 if hit.numel() else n)
    return out


def ms_per_token(model: Any, prompt: torch.Tensor, steps: int = 64, budget_s: float = 60.0) -> dict[str, Any]:
    """Median (min, max) of 5 runs of (steps tokens - the prefill alone) / steps, after warm-up
    until two successive medians agree within 3% (fla autotunes and Triton compiles first), at most
    8 rounds and no new round after ``budget_s`` seconds (fla's eager decode takes ~30 ms a token
    at 4 layers: a round of 5 x 65 tokens is ~10 s); ``warm`` says whether the medians agreed."""

    def once() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loop(model, prompt, steps)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        loop(model, prompt, 0)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        return ((t1 - t0) - (t2 - t1)) / (steps - 1) * 1e3  # steps tokens, steps - 1 decode forwards

    t_start = time.perf_counter()
    loop(model, prompt, 4)
    prev, rounds = None, 0
    while True:
        runs = [once() for _ in range(5)]
        med = statistics.median(runs)
        rounds += 1
        warm = prev is not None and abs(med - prev) <= 0.03 * prev
        if warm or rounds >= 8 or time.perf_counter() - t_start > budget_s:
            return {"median_ms": med, "min_ms": min(runs), "max_ms": max(runs), "warm_rounds": rounds, "warm": warm}
        prev = med


def first_split(a: torch.Tensor, b: torch.Tensor, ends: list[int]) -> list[tuple[int, int]]:
    """(row, step) of the first differing token of each row that differs within its first ends[row]."""
    out = []
    for row in range(a.shape[0]):
        d = (a[row, :ends[row]] != b[row, :ends[row]]).nonzero()
        if d.numel():
            out.append((row, int(d[0])))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of warm-up per model before timing anyway")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_apply_demo: needs a CUDA GPU (fla's kernels run there); the CPU checks of momtune.apply are "
              "tests/model/test_apply_fla.py", file=sys.stderr)
        return 2
    import momtune
    from momtune.reference.checkpoint import as_config

    dtype = getattr(torch, a.dtype)
    say = lambda msg: print(f"[{time.perf_counter() - t_run:6.1f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    t_run = time.perf_counter()
    fla = fla_model(a.layers, dtype, a.seed)
    fast = copy.deepcopy(fla)
    t0 = time.perf_counter()
    _, summary = momtune.apply(fast)
    apply_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(a.seed + 1)
    ids = torch.randint(1, 32000, (a.batch, a.prompt), generator=g).to("cuda")
    say(f"momtune.apply done; fla's greedy tokens ({a.batch} x {a.new})")
    want = loop(fla, ids, a.new)  # fla's greedy tokens on its own cache
    ends = upto_eos(want, getattr(fla.config, "eos_token_id", None))
    say("the applied model through transformers' generate")
    got = hf_greedy(fast, ids, a.new)  # the applied model through transformers' generate
    fla_gen = hf_greedy(fla, ids, a.new)  # fla itself through generate (its cache handling under this transformers)
    fla_generate_equal = not first_split(fla_gen, want, ends)
    splits = first_split(got, want, ends)
    notes = []
    if splits:  # the float64 reference's margin between the two tokens where they part
        ref64 = momtune.reference.MoMForCausalLM(as_config(fla.config)).eval()
        ref64.load_state_dict(fla.state_dict(), strict=True)
        ref64.to("cuda", torch.float64)
        for row, k in splits:
            prefix = torch.cat([ids[row], want[row, :k]])[None]
            with torch.no_grad():
                last = ref64(prefix).logits[0, -1]
            notes.append({"row": row, "step": k, "fla": int(want[row, k]), "momtune": int(got[row, k]),
                          "float64_margin": float((last[want[row, k]] - last[got[row, k]]).abs())})
        del ref64
    prompt = ids[:1]
    say("timing fla")
    times = {"fla": ms_per_token(fla, prompt, budget_s=a.budget)}
    say("timing momtune.apply")
    times["momtune.apply"] = ms_per_token(fast, prompt, budget_s=a.budget)
    same = not splits
    res = {"gpu": torch.cuda.get_device_name(), "dtype": a.dtype, "layers": a.layers, "batch": a.batch,
           "prompt": a.prompt, "new": a.new, "seed": a.seed, "swapped": dict(summary.swapped), "apply_s": apply_s,
           "tokens_equal": same, "tokens_compared": sum(ends), "splits": notes,
           "fla_generate_equals_its_loop": fla_generate_equal, "ms_per_token_b1": times,
           "speedup_b1": times["fla"]["median_ms"] / times["momtune.apply"]["median_ms"],
           "versions": {"torch": torch.__version__, "momtune": momtune.__version__}}
    try:
        import fla as fla_pkg
        import transformers
        import triton
        res["versions"].update(fla=fla_pkg.__version__, transformers=transformers.__version__, triton=triton.__version__)
    except Exception:  # noqa: BLE001 - versions are informative
        pass
    print(f"fla MomForCausalLM, {a.layers} layers of mom-340m, {a.dtype}, {res['gpu']}: momtune.apply swapped "
          f"{res['swapped']} in {apply_s:.2f} s")
    print(f"greedy, B{a.batch} prompt {a.prompt} +{a.new} ({sum(ends)} tokens up to EOS): momtune.apply'd model "
          "through HF generate " + ("= fla's own greedy tokens" if same else f"parts from fla's at {notes}")
          + f"; fla through HF generate {'=' if fla_generate_equal else '!='} its own greedy loop")
    print(f"{'':16}{'ms/token (B1, eager)':>22}{'min-max':>18}")
    for name, t in times.items():
        print(f"{name:16}{t['median_ms']:>22.3f}{t['min_ms']:>9.3f}-{t['max_ms']:.3f}"
              + ("" if t["warm"] else f"  (not settled after {t['warm_rounds']} rounds)"))
    print(f"speed-up: {res['speedup_b1']:.2f}x")
    if a.out:
        tmp = a.out.with_suffix(a.out.suffix + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(a.out)
    return 0 if same or a.dtype != "float32" else 1


if __name__ == "__main__":
    sys.exit(main())
