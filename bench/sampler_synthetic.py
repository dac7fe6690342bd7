"""The pattern search against an earlier version of it on random kernel-like landscapes over the
real search spaces (a CPU check that a change to momtune/pattern.py helps beyond the one landscape
it was made for).

A landscape: log time = a main effect per parameter (a parabola over a numeric parameter's choices,
a random value per named choice) + random interactions of a few pairs of parameters + a few pairs
of values that fail (as a config that faults does); every trial's time jittered by ``--noise``. The
searches ask their candidates as the search driver does (momtune.search): ``--batch`` at a time
(2: a quarter of 11 trials), or 16 at a time for the version before the driver's cap (the default
``--old`` revision, 1c15072, ran so with --workers 16). Reported: per space and budget, the median
and geometric mean of the winner's time over the landscape's best, and how many landscapes end
within 2% of it. Random search beside them.

    python bench/sampler_synthetic.py                      # 40 landscapes a case (a few minutes)
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [("recurrence", "bench/spaces", 22), ("decode", None, 40), ("recurrence", None, 40)]
FAMILIES = {"separable": dict(inter=0.0, pairs=0), "mild": dict(inter=0.15, pairs=3), "strong": dict(inter=0.3, pairs=4)}


def old_module(rev: str) -> Any:
    """momtune/pattern.py as of ``rev``, imported as momtune.pattern_old."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:momtune/pattern.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "pattern_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("momtune.pattern_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def landscape(space: Any, valid: list[dict], seed: int, inter: float, pairs: int, fails: int = 1,
              main: float = 0.2) -> dict[str, float | None]:
    from momtune.pattern import _numeric
    from momtune.space import canonical

    rng = random.Random(seed)
    names = list(space.parameters)
    effect: dict[str, dict[Any, float]] = {}
    for n in names:
        choices, scale = list(space.parameters[n].choices), rng.uniform(0, main)
        if _numeric(choices) and len(choices) > 2:
            ranked, best = sorted(choices), rng.uniform(0, len(choices) - 1)
            effect[n] = {v: scale * (ranked.index(v) - best) ** 2 / (len(choices) - 1) for v in choices}
        else:
            effect[n] = {v: rng.gauss(0, scale) for v in choices}
    tables = []
    for _ in range(pairs):
        a, b = rng.sample(names, 2)
        tables.append((a, b, {(x, y): rng.gauss(0, inter) for x in space.parameters[a].choices
                              for y in space.parameters[b].choices}))
    bad = []
    for _ in range(fails):
        a, b = rng.sample(names, 2)
        bad.append((a, rng.choice(space.parameters[a].choices), b, rng.choice(space.parameters[b].choices)))
    default = canonical(space.default_config())
    out: dict[str, float | None] = {}
    for c in valid:
        key = canonical(c)
        if key != default and any(c[a] == va and c[b] == vb for a, va, b, vb in bad):
            out[key] = None
            continue
        out[key] = math.exp(sum(effect[n][c[n]] for n in names) + sum(t[(c[a], c[b])] for a, b, t in tables))
    return out


def run(cls: Any, space: Any, valid: list[dict], seed: int, times: dict, budget: int, batch: int, noise: float) -> float:
    """The winner's true time over the best: ``batch`` candidates asked at a time, each measured with
    jitter, the winner the fastest measured."""
    from momtune.space import canonical

    search = cls(space, valid, space.default_config(), seed, [])
    seen: dict[str, float] = {}
    done: set[str] = set()
    rng = random.Random(seed * 31 + 7)
    while len(done) < min(budget, len(valid)):
        asked = search.candidates(seen, done, limit=min(batch, budget - len(done)))
        if not asked:
            break
        for c in asked:
            key = canonical(c)
            done.add(key)
            if times[key] is not None:
                seen[key] = times[key] * math.exp(rng.gauss(0, noise))
    return times[min(seen, key=seen.get)] / min(t for t in times.values() if t is not None)


def random_search(space: Any, valid: list[dict], seed: int, times: dict, budget: int) -> float:
    from momtune.space import canonical

    default = canonical(space.default_config())
    keys = [canonical(c) for c in valid if canonical(c) != default]
    random.Random(seed).shuffle(keys)
    picked = [default] + keys[:budget - 1]
    return min(times[k] for k in picked if times[k] is not None) / min(t for t in times.values() if t is not None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", default="1c15072", help="git revision of the pattern search to compare against")
    p.add_argument("--landscapes", type=int, default=40)
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=None,
                   help="configs asked at a time (default: the search driver's, a quarter of the trials, 2-16)")
    args = p.parse_args()

    from momtune import pattern
    from momtune.space import load_space

    old = old_module(args.old)
    print(f"pattern search now vs at {args.old}; {args.landscapes} landscapes a row, {args.noise:.1%} jitter; "
          "winner over best: median, geometric mean, landscapes within 2%")
    print("| space | configs | trials | landscapes | old, 16 at a time | old, 2 at a time | now, 2 at a time | random |")
    print("|---|---|---|---|---|---|---|---|")
    for name, space_dir, budget in CASES:
        space = load_space(name, str(ROOT / space_dir) if space_dir else None)
        sets = [s for s in space.shape_sets if s != "tiny"]
        shape = space.shape_sets[sets[0]].shapes[len(space.shape_sets[sets[0]].shapes) // 2]
        valid = space.enumerate(shape)
        batch = args.batch or min(16, max(2, budget // 4))
        for family, kw in FAMILIES.items():
            rows: dict[str, list[float]] = {"blind": [], "old": [], "new": [], "random": []}
            for s in range(args.landscapes):
                times = landscape(space, valid, 1000 + s, **kw)
                rows["blind"].append(run(old.PatternSearch, space, valid, s, times, budget, 16, args.noise))
                rows["old"].append(run(old.PatternSearch, space, valid, s, times, budget, batch, args.noise))
                rows["new"].append(run(pattern.PatternSearch, space, valid, s, times, budget, batch, args.noise))
                rows["random"].append(random_search(space, valid, s, times, budget))
            cells = [f"{statistics.median(v):.3f} / {math.exp(statistics.mean(map(math.log, v))):.3f} / "
                     f"{sum(x <= 1.02 for x in v)}" for v in rows.values()]
            where = f"{name} ({space_dir})" if space_dir else name
            print(f"| {where}, {family} | {len(valid)} | {budget} | {args.landscapes} | " + " | ".join(cells) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
