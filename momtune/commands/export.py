"""momtune export: write the tuned library (winners of one GPU's studies) as JSON, atomically."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the winners of the studies of one GPU as a tuned library (JSON)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage URL (MOMTUNE_STORAGE, default sqlite:///momtune.db)")
    p.add_argument("--out", required=True, metavar="FILE", help="library file to write (e.g. library/h100.json)")
    p.add_argument("--template", action="append", default=None, metavar="NAME",
                   help="only these templates (repeatable; default all)")
    p.add_argument("--gpu", default=None,
                   help="export the studies of this GPU name (default: the only one, else this machine's, else the "
                        "one with most studies, with a warning)")
    p.add_argument("--study", default=None, metavar="PREFIX", help="export studies named PREFIX/... (several: PREFIX,PREFIX; '*': every study); where several studies tuned a shape, the larger speed-up over the default each re-timed with wins")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it holds what this export would lose: the library of another GPU "
                        "or Triton version, entries of templates this export lacks, or a file that is not a "
                        "momtune library (refused without it, the file untouched)")
    p.add_argument("--merge", action="store_true",
                   help="grow the library already in --out (same GPU and Triton version): its templates and "
                        "shapes this export has no entry of, and its entries faster over their own default, are "
                        "kept, each with the provenance it was tuned with")
    p.add_argument("--json", action="store_true",
                   help="print what was written as JSON on stdout (file, GPU, Triton, entries per template)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from momtune import settings
    from momtune.library import export_library

    console = Console(stderr=True)
    lib = export_library(args.storage or settings.load().storage, args.out, args.template, args.gpu, args.study,
                         note=lambda m: console.print(m, markup=False, highlight=False), force=args.force,
                         merge=args.merge)
    n = sum(len(t["entries"]) for t in lib["templates"].values())
    gpu = lib["provenance"]["gpu"]
    if args.json:
        import json

        print(json.dumps({"out": str(args.out), "gpu": gpu, "triton": lib["provenance"].get("triton"), "entries": n,
                          "templates": {k: len(t["entries"]) for k, t in lib["templates"].items()}}, indent=1))
        return 0
    extra = " (interpreter timings: not GPU performance)" if gpu == "interpreter" else ""
    print(f"wrote {args.out}: {n} entries of {len(lib['templates'])} templates for GPU {gpu!r}{extra}")
    return 0
