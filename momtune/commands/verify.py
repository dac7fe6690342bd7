"""momtune verify: re-check a tuned library on this machine (provenance, correctness, speed-up)."""
from __future__ import annotations

import argparse
import math
from typing import Any

from momtune.commands import SEED_MAX, int_in, seconds
from momtune.timing import NOISE_FLOOR, judge


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="re-run a library's configs against the reference and re-time tuned vs default",
                       description="Checks the library's provenance against this machine and every entry's "
                                   "config against the template's search space, runs each config on fresh inputs "
                                   "against the float64 reference, and re-times tuned vs default (interleaved; each "
                                   "time with its spread). Exit status 1 if any tuned config is outside its search "
                                   "space, fails its check or is slower than the default beyond noise, or if no "
                                   "entry was checked.")
    p.add_argument("library", metavar="FILE", help="library JSON written by momtune export")
    p.add_argument("--policy", default=None, choices=("strict", "warn", "ignore"),
                   help="provenance mismatch: strict = refuse (also a missing provenance field or source_hash, "
                        "or an unknown field), warn = report and go on (MOMTUNE_POLICY, warn)")
    p.add_argument("--template", action="append", default=None, metavar="NAME", help="only these templates")
    p.add_argument("--trial-timeout", type=seconds, default=None, metavar="S", help="per run (120 GPU, 300 interpreter)")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=12345, help=f"input seed, 0 .. {SEED_MAX} (12345)")
    p.add_argument("--template-spec", action="append", default=[], metavar="NAME=MODULE:ATTR",
                   help="load the library's unregistered template NAME from MODULE:ATTR (a library never names "
                        "code to import; registered templates need nothing)")
    p.add_argument("--space-dir", default=None, metavar="DIR",
                   help="search spaces (<name>.toml) of templates momtune does not ship; the entries' configs are "
                        "checked against them (momtune's own search_spaces/ for registered templates)")
    p.add_argument("--json", action="store_true",
                   help="print every checked entry and the verdict as JSON on stdout (the table goes to stderr)")
    p.set_defaults(func=run)


def verify(path: str, policy: str, templates: list[str] | None, timeout: float | None, seed: int,
           note: Any = print, allowed: dict[str, str] | None = None,
           space_dir: str | None = None) -> list[dict[str, Any]]:
    """One row per library entry: status of the tuned and default configs, times, speed-up. An
    entry whose config is not in its template's search space is an ``invalid_config`` row, not run."""
    from momtune.dispatch import this_machine
    from momtune.errors import LibraryError
    from momtune.library import (
        config_problem,
        load_library,
        provenance_problems,
        source_problem,
    )
    from momtune.space import find_space
    from momtune.templates import library_spec, resolve_template
    from momtune.timing import TimingOptions
    from momtune.worker import Worker, prepare_environment

    interpreter = prepare_environment()
    lib = load_library(path)
    strict = policy == "strict"
    problems = provenance_problems(lib.provenance, this_machine(), strict)
    spaces: dict[str, Any] = {}
    for name, tmpl in lib.templates.items():
        if templates and name not in templates:
            continue
        try:
            template = resolve_template(library_spec(name, tmpl.get("spec"), allowed))
        except Exception as exc:  # noqa: BLE001
            problems.append(f"template {name}: cannot be loaded here ({exc})")
            continue
        problem = source_problem(name, tmpl, template.source_hash(), strict)
        if problem:
            problems.append(problem)
        spaces[name] = find_space(name, space_dir, template)
        if spaces[name] is None and tmpl["entries"]:
            note(f"note: template {name}: no search space {name}.toml in momtune's search_spaces/"
                 f"{' or --space-dir ' + space_dir if space_dir else ''}; its configs are checked against the "
                 "template's parameters and the choices the library records as searched (give --space-dir DIR to "
                 "check them against the space file)")
    for u in lib.unknown:
        note(f"{'error' if strict else 'warning'}: library {path}: {u}")
    for p in problems:
        note(f"provenance mismatch: {p}")
    if strict and (problems or lib.unknown):
        raise LibraryError(f"library {path}: " + "; ".join(problems + lib.unknown) + " [policy strict]")
    timing = TimingOptions(interpreter=True, runs=3, rounds=2) if interpreter else TimingOptions(interpreter=False)
    t_out = timeout or (300.0 if interpreter else 120.0)
    worker = Worker("cpu" if interpreter else "cuda", {"TRITON_INTERPRET": "1"} if interpreter else {}, "momtune-verify")
    rows: list[dict[str, Any]] = []
    try:
        for name, tmpl in lib.templates.items():
            if templates and name not in templates:
                continue
            spec = library_spec(name, tmpl.get("spec"), allowed)
            template = resolve_template(spec)
            default = dict(template.default_config)
            for e in tmpl["entries"]:
                outside = config_problem(e["config"], e["shape"], template, spaces.get(name), tmpl.get("choices"))
                if outside:
                    rows.append({"template": name, "shape": e["shape"], "dtype": e["dtype"], "config": e["config"],
                                 "status": "invalid_config", "reason": outside, "default_status": None,
                                 "library_ms": e.get("time_ms"), "max_rel_err": None, "tuned_ms": None,
                                 "default_ms": None})
                    continue
                base = {"template": spec, "shape": e["shape"], "dtype": e["dtype"], "seed": seed,
                        "timing": timing.__dict__}
                tuned = worker.call({**base, "op": "trial", "config": e["config"]}, t_out)
                dflt = worker.call({**base, "op": "trial", "config": default}, t_out)
                row = {"template": name, "shape": e["shape"], "dtype": e["dtype"], "config": e["config"],
                       "status": tuned.get("status"), "reason": tuned.get("reason", ""),
                       "default_status": dflt.get("status"), "library_ms": e.get("time_ms"),
                       "max_rel_err": tuned.get("max_rel_err"), "tuned_ms": None, "default_ms": None}
                if tuned.get("status") == "ok" and dflt.get("status") == "ok":
                    rt = worker.call({**base, "op": "retime", "configs": [e["config"], default]}, 3 * t_out)
                    if rt.get("status") == "ok":
                        (row["tuned_ms"], row["tuned_spread"], _), (row["default_ms"], row["default_spread"], _) = \
                            rt["times"][0], rt["times"][1]
                        # the library's config is the default: the same kernel timed twice, no
                        # verdict (a loaded machine could call one run of it slower than the other)
                        row["speed"] = "the default" if dict(e["config"]) == dict(default) else judge(
                            row["tuned_ms"], row["default_ms"], row["tuned_spread"], row["default_spread"])
                elif tuned.get("status") == "ok":
                    row["tuned_ms"] = tuned.get("time_ms")
                rows.append(row)
    finally:
        worker.close()
    return rows


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from momtune import settings
    from momtune.errors import InputError
    from momtune.progress import fmt_config, fmt_ms

    policy = args.policy or settings.load().policy
    console = Console(stderr=args.json) if Console().is_terminal else Console(width=200, stderr=args.json)
    allowed: dict[str, str] = {}
    for item in args.template_spec:
        name, sep, spec = item.partition("=")
        if not sep or not name or ":" not in spec:
            raise InputError(f"--template-spec: expected NAME=MODULE:ATTR, got {item!r}")
        allowed[name] = spec
    rows = verify(args.library, policy, args.template, args.trial_timeout, args.seed,
                  note=lambda m: console.print(m, markup=False, highlight=False), allowed=allowed,
                  space_dir=args.space_dir)
    table = Table(title=f"momtune verify {args.library}")
    for col in ("template", "shape", "dtype", "config", "check", "tuned", "default", "speed-up", "library", "rel err"):
        table.add_column(col)
    bad = slower = 0

    def timed(ms: float | None, spread: float | None) -> str:
        return fmt_ms(ms) + (f" ±{spread:.0%}" if ms is not None and spread is not None else "")

    for r in rows:
        ok = r["status"] == "ok"
        bad += not ok
        slower += r.get("speed") == "slower"
        speed = (f"{r['default_ms'] / r['tuned_ms']:.2f}x ({r.get('speed', '?')})" if r["tuned_ms"] and r["default_ms"]
                 and math.isfinite(r["tuned_ms"]) else "-")
        check = "ok" if ok else f"{r['status']}: {r['reason']}"
        err = r.get("max_rel_err")
        table.add_row(r["template"], " ".join(f"{k}{v}" for k, v in r["shape"].items()), r["dtype"],
                      fmt_config(r["config"]), check, timed(r["tuned_ms"], r.get("tuned_spread")),
                      timed(r["default_ms"], r.get("default_spread")), speed,
                      fmt_ms(r["library_ms"]), "-" if err is None else f"{err:.1e}")
    console.print(table)
    if args.json:  # the rows, and the verdict the exit status gives
        import json

        from momtune.commands import finite

        print(json.dumps({"library": str(args.library), "rows": finite(rows),
                          "failed": bad, "slower": slower, "checked": len(rows)}, indent=1, default=str))
    if not rows:
        from momtune.library import load_library

        what = f" for --template {', '.join(args.template)}" if args.template else ""
        held = {n: len(t["entries"]) for n, t in load_library(args.library).templates.items()}
        holds = ", ".join(f"{n} ({k} entries)" for n, k in sorted(held.items())) or "no templates"
        console.print(f"no entries checked: the library has none{what} (it holds {holds})", markup=False)
        return 1
    if bad:
        console.print(f"{bad} of {len(rows)} tuned configs failed their check on this machine", markup=False)
    if slower:
        console.print(f"{slower} of {len(rows)} tuned configs are slower than the default beyond noise "
                      f"(the larger spread of the two, at least {NOISE_FLOOR:.0%}): the default should run there",
                      markup=False)
    if bad or slower:
        return 1
    console.print(f"all {len(rows)} tuned configs pass their check and none is slower than the default beyond noise",
                  markup=False)
    return 0
