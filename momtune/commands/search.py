"""momtune search: autotune templates on a shape set (one Optuna study per template, GPU, shape)."""
from __future__ import annotations

import argparse

from momtune.commands import SEED_MAX, finite, int_in, seconds


# --effort presets (per study, i.e. per template and shape): quick answers within half a minute
# from the default's neighbourhood; full searches for two minutes
EFFORT: dict[str, dict] = {
    "quick": {"sampler": "pattern", "trials": 40, "timeout": 30.0},
    "full": {"sampler": "pattern", "trials": 400, "timeout": 120.0},
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="autotune templates on a shape set; resumable (a rerun continues the same studies)",
        description="Each trial compiles a config, checks it against the float64 reference on fresh inputs and "
                    "times it. Without a GPU the Triton interpreter runs (use --shapes tiny): timings are then "
                    "interpreter timings. Trials already in the storage count toward --trials.")
    p.add_argument("--template", action="append", required=True, metavar="NAME",
                   help="template name (repeatable), 'all' for every template with a search space, or "
                        "module:ATTR for an unregistered template")
    p.add_argument("--shapes", required=True, metavar="SET", help="shape set of the search space (e.g. tiny, decode)")
    p.add_argument("--trials", type=int_in(1), default=None,
                   help="trials per study, those already done included (20; --effort sets its own)")
    p.add_argument("--timeout", type=seconds, default=None, metavar="S", help="no new trials in a study after S seconds")
    p.add_argument("--sampler", default=None,
                   help="tpe (default) | random | grid (= exhaustive: every valid config once) | pattern (a local "
                        "search from the default config: its neighbours first, a move the constraints forbid "
                        "repaired by a second parameter, then two-parameter moves, then the rest)")
    p.add_argument("--effort", choices=sorted(EFFORT), default=None,
                   help="a preset of sampler, trials and time per study: "
                        + "; ".join(f"{k}: {v['sampler']}, up to {v['trials']} trials and {v['timeout']:g} s"
                                    for k, v in EFFORT.items())
                        + " (flags given explicitly win)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage URL (MOMTUNE_STORAGE, default sqlite:///momtune.db; postgresql://... works)")
    p.add_argument("--study", default=None, metavar="PREFIX", help="prefix study names with PREFIX/")
    p.add_argument("--workers", type=int_in(1), default=None, metavar="N", help="compile workers on a GPU (min(cores, 8)); in the interpreter, given N pre-runs "
                   "candidates. A batch compiles up to N candidates at once (TPE and pattern: at most a "
                   "quarter of --trials, so that they learn between batches)")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0, help=f"sampler and input seed, 0 .. {SEED_MAX} (0)")
    p.add_argument("--no-transfer", action="store_true",
                   help="pattern search: do not measure the winners of the template's other studies on this GPU "
                        "nor the space's [[starts]] first (sampler comparisons use it: a study must not start "
                        "from a known answer)")
    p.add_argument("--space-dir", default=None, metavar="DIR", help="read search spaces from DIR instead of the package")
    p.add_argument("--trial-timeout", type=seconds, default=None, metavar="S",
                   help="kill a trial after S seconds (120 on a GPU, 300 in the interpreter)")
    p.add_argument("--retime", type=int_in(1), default=3, metavar="K", help="re-time the best K configs interleaved (3)")
    p.add_argument("--rounds", type=int_in(1), default=None, help="interleaved re-timing rounds (5 GPU, 3 interpreter)")
    p.add_argument("--heartbeat", type=int_in(1), default=10, metavar="S",
                   help="trial heartbeat; a trial silent for 3*S seconds (its process died) is failed and redone (10)")
    p.add_argument("--devices", type=device_list, default=None, metavar="LIST",
                   help="GPUs to benchmark on, one worker each, all on the same studies: 'all' (every visible "
                        "GPU, the default) or indices such as 0,1. Without a GPU, each listed index is one more "
                        "interpreter worker (to test the scheduling)")
    p.add_argument("--json", action="store_true",
                   help="print each study's result as JSON on stdout (progress and tables go to stderr)")
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true", help="print only each study's winner and the summary")
    talk.add_argument("-v", "--verbose", action="store_true", help="print every trial, also on a terminal")
    p.set_defaults(func=run)


def device_list(text: str) -> list[int] | None:
    """'all' -> None (every visible GPU); '0,2' -> [0, 2] (distinct indices >= 0)."""
    if text.strip().lower() == "all":
        return None
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or GPU indices such as 0,1, got {text!r}") from None
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct GPU indices >= 0 such as 0,1, got {text!r}")
    return out


def effort(args: argparse.Namespace) -> tuple[int, float | None, str]:
    """Trials, timeout per study and sampler: the flags given, else the --effort preset's, else
    the defaults (20 trials, no timeout, tpe)."""
    preset = EFFORT.get(args.effort or "", {})
    trials = args.trials or preset.get("trials", 20)
    timeout = args.timeout if args.timeout is not None else preset.get("timeout")
    return trials, timeout, args.sampler or preset.get("sampler", "tpe")


def template_specs(requested: list[str], space_dir: str | None, note: object = print) -> list[str]:
    """Expand 'all' to the registered templates that have a search space and can be imported."""
    from momtune.space import space_names
    from momtune.templates import registered_names, resolve_template

    out: list[str] = []
    for name in requested:
        if name != "all":
            out.append(name)
            continue
        spaces = set(space_names(space_dir))
        for reg in registered_names():
            if reg not in spaces:
                note(f"skipping template {reg!r}: no search space {reg}.toml")  # type: ignore[operator]
                continue
            try:
                resolve_template(reg)
            except ImportError as exc:
                note(f"skipping template {reg!r}: cannot be imported ({exc})")  # type: ignore[operator]
                continue
            out.append(reg)
    return list(dict.fromkeys(out))


def run(args: argparse.Namespace) -> int:
    from momtune import settings
    from momtune.errors import InputError
    from momtune.progress import RichReporter
    from momtune.search import SearchOptions, search
    from momtune.worker import prepare_environment

    import signal

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # kill: in-flight trials are released like on Ctrl-C

    signal.signal(signal.SIGTERM, terminate)
    prepare_environment()  # before any kernel module is imported
    reporter = RichReporter(verbosity=-1 if args.quiet else 1 if args.verbose else 0, stderr=args.json)
    specs = template_specs(args.template, args.space_dir, reporter.note)
    if "all" in args.template:  # 'all' means every template that has this shape set
        from momtune.space import load_space

        keep = [s for s in specs if args.shapes in load_space(s, args.space_dir).shape_sets]
        for s in sorted(set(specs) - set(keep)):
            reporter.note(f"skipping template {s!r}: its search space has no shape set {args.shapes!r}")
        specs = keep
    if not specs:
        raise InputError("--template: no template to search")
    trials, timeout, sampler = effort(args)
    opts = SearchOptions(trials=trials, timeout_s=timeout, sampler=sampler,
                         storage=args.storage or settings.load().storage, study_prefix=args.study,
                         workers=args.workers, seed=args.seed, space_dir=args.space_dir,
                         trial_timeout_s=args.trial_timeout, retime=args.retime, rounds=args.rounds,
                         heartbeat_s=args.heartbeat, devices=args.devices, transfer=not args.no_transfer)
    results = search(specs, args.shapes, opts, reporter)
    reporter.summary(results)
    if args.json:
        import dataclasses
        import json

        print(json.dumps([finite(dataclasses.asdict(r)) for r in results], indent=1, allow_nan=False, default=str))
    failed = [r.study for r in results if r.winner is None]
    if failed:
        reporter.note(f"[red]no config passed the check in: {', '.join(failed)}[/]")
        return 1
    return 0
