"""Sampler comparison replayed offline: each sampler searches a recorded study (e.g. session 10's
exhaustive sweep of the reduced recurrence space on the H200) used as an oracle, with the GPU
stage's budget and flags (``bench/gpu_session.sh sampler``: 11 trials = 20% of the 56 configs,
``--workers 16 --no-transfer``), through ``momtune search``'s own driver (momtune.replay).

    python bench/sampler_replay.py                       # TPE, random, pattern; seeds 0 1 2; 11 trials
    python bench/sampler_replay.py --trials 11 15 20 --seeds 40 --noise 0.015   # hit rates over 40 seeds
    python bench/sampler_replay.py --study 'quick/norm:nvidia-h200:N4096-D1024-residual1-bfloat16' \
        --space-dir '' --samplers pattern
    python bench/sampler_replay.py --measured tpe random pattern   # the GPU's own studies, no replay
    python bench/sampler_replay.py --study 'quick/*' --space-dir '' --share 0.33 --samplers pattern

Per seed: the winner's recorded time over the study's best (+x%), the median over the seeds,
and how many seeds land within 2% of the best. A replay, not a GPU measurement: each config has
its one recorded time (``--noise`` jitters each trial's time by that relative amount, seeded).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from typing import Any
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H200 = "exhaustive/recurrence:nvidia-h200:N49152-S40-H4-K256-V256-bfloat16"
WITHIN = 0.02


def short(config: dict | None) -> str:
    return "-" if not config else " ".join(f"{k}={v}" for k, v in config.items())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", default="sqlite:///.bench/momtune-h100.db")
    p.add_argument("--study", action="append", default=None,
                   help=f"recorded study to replay (repeatable; {H200}); with * a pattern over the storage's "
                        "studies, the latest version of each")
    p.add_argument("--space-dir", default="bench/spaces", help="search spaces of the studies ('' for the package's)")
    p.add_argument("--samplers", nargs="+", default=["tpe", "random", "pattern"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds; one number N > 3 means seeds 0 .. N-1 (a hit rate, no per-seed columns)")
    p.add_argument("--trials", type=int, nargs="+", default=[11])
    p.add_argument("--share", type=float, default=None, metavar="F",
                   help="instead of --trials: F of each study's recorded configs (at least 6)")
    p.add_argument("--transfer", action="store_true", help="replay without --no-transfer (the space's [[starts]] first)")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--noise", type=float, default=0.0, help="relative jitter of each trial's time (0.015: 1.5%%)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every run as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="print each run's trials")
    p.add_argument("--measured", nargs="+", default=None, metavar="PREFIX",
                   help="no replay: the winners of the GPU's studies PREFIX-sSEED/<the study's name> (e.g. tpe random "
                        "pattern2) looked up in the study (bench/gpu_session.sh sampler prints this table)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")

    from momtune.replay import Landscape, replay

    if args.measured:
        return measured(args, Landscape)

    seeds = list(range(args.seeds[0])) if len(args.seeds) == 1 and args.seeds[0] > 3 else args.seeds
    columns = len(seeds) <= 5
    rows = []
    for name in studies(args.storage, args.study or [H200]):
        land = Landscape.from_study(args.storage, name, args.space_dir or None)
        n_ok = len(land.times())
        if n_ok < 2:
            print(f"\n## {name}: {n_ok} ok configs valid in today's space, skipped")
            continue
        print(f"\n## {name}\n{len(land.results)} configs recorded ({n_ok} ok; "
              f"{'every valid config' if land.complete else 'part of the space: replayed on those'}), "
              f"best {land.best_ms:.4g} ms: {short(land.best_config)}")
        head = "| sampler | trials | " + (" | ".join(f"seed {s}" for s in seeds) + " | " if columns else "") \
            + f"median | within {WITHIN:.0%} |"
        print(head + "\n|" + "---|" * (head.count("|") - 1))
        for trials in [max(6, int(len(land.results) * args.share))] if args.share else args.trials:
            for sampler in args.samplers:
                t0 = time.monotonic()
                runs = [replay(land, sampler, s, trials, args.workers, args.noise, transfer=args.transfer) for s in seeds]
                ratios = [r.ratio for r in runs]
                hits = sum(x <= 1 + WITHIN for x in ratios)
                cells = [f"{x - 1:+.1%}" for x in ratios] if columns else []
                print(f"| {sampler} | {trials} | " + "".join(c + " | " for c in cells)
                      + f"{statistics.median(ratios) - 1:+.1%} | {hits}/{len(runs)} |"
                      + (f"  ({time.monotonic() - t0:.0f} s)" if args.verbose else ""))
                for r in runs:
                    rows.append({"study": name, "sampler": sampler, "seed": r.seed, "trials": trials,
                                 "noise": args.noise, "done": r.trials, "winner": r.winner, "winner_ms": r.winner_ms,
                                 "best_ms": r.best_ms, "ratio": r.ratio, "found_ms": r.found_ms,
                                 "measured": [[c, s, t] for c, s, t in r.measured]})
                    if args.verbose:
                        print(f"    seed {r.seed}: winner {short(r.winner)} {r.winner_ms:.4g} ms; measured: "
                              + ", ".join(f"{t:.3g}" if t is not None else s for _, s, t in r.measured))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def studies(storage: str, names: list[str]) -> list[str]:
    """``names``, a name with ``*`` expanded to the storage's matching studies (the last version of each:
    ``name@hash`` is a later version of ``name``)."""
    import fnmatch

    import optuna

    from momtune.study import open_storage

    out: list[str] = []
    for name in names:
        if "*" not in name:
            out.append(name)
            continue
        latest: dict[str, str] = {}
        for s in optuna.get_all_study_summaries(open_storage(storage, read_only=True), include_best_trial=False):
            if fnmatch.fnmatch(s.study_name, name):
                latest[s.study_name.split("@")[0]] = s.study_name
        out += [latest[k] for k in sorted(latest)]
    return out


def measured(args: argparse.Namespace, landscape: type) -> int:
    """Each GPU study's winner (re-timed on the GPU) looked up in the exhaustive study, per seed."""
    import optuna

    from momtune.space import canonical
    from momtune.study import open_storage

    storage = open_storage(args.storage, read_only=True)

    def source(study_name: str) -> str | None:
        s = optuna.load_study(study_name=study_name, storage=storage)
        return (s.user_attrs.get("provenance") or {}).get("source_hash")

    def same_version(prefix: str, seed: int, rest: str, version: str | None) -> Any:
        """The study PREFIX-sSEED of the exhaustive one's kernel version: under the same name, or
        under the unversioned one (a study name that was new when that version ran)."""
        for candidate in dict.fromkeys([rest, rest.split("@")[0]]):
            try:
                if source(f"{prefix}-s{seed}/{candidate}") == version:
                    return optuna.load_study(study_name=f"{prefix}-s{seed}/{candidate}", storage=storage)
            except KeyError:
                continue
        return None

    for name in studies(args.storage, args.study or [H200]):
        land = landscape.from_study(args.storage, name, args.space_dir or None)
        times, rest, version = land.times(), name.split("/", 1)[-1], source(name)
        print(f"\n## GPU studies against {name} (best {land.best_ms:.4g} ms)\n")
        print("| sampler | " + " | ".join(f"seed {s}" for s in args.seeds) + " | median | within 2% |")
        print("|---|" + "---|" * (len(args.seeds) + 2))
        for prefix in args.measured:
            cells, ratios = [], []
            for seed in args.seeds:
                study = same_version(prefix, seed, rest, version)
                w = study.user_attrs.get("winner") if study is not None else None
                # a parameter added to the space since the study ran takes its default, as in the landscape
                t = times.get(canonical({**land.space.default_config(), **w["config"]})) if w else None
                ratios += [t / land.best_ms] if t else []
                cells.append(f"{t / land.best_ms - 1:+.1%}" if t else "-")
            med = f"{statistics.median(ratios) - 1:+.1%}" if ratios else "-"
            print(f"| {prefix} | " + " | ".join(cells) + f" | {med} | {sum(r <= 1 + WITHIN for r in ratios)}/{len(ratios)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
