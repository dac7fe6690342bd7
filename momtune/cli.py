"""The ``momtune`` command line. Each subcommand lives in ``momtune/commands/<name>.py`` and
exposes ``register(subparsers)`` (adds its parser, with help text, and sets ``func``)."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import MomtuneError

COMMANDS = ("search", "export", "verify", "bench", "report", "list")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="momtune",
        description="Autotune, validate and export Triton kernels for Mixture-of-Memories linear attention.",
    )
    parser.add_argument("--version", action="version", version=f"momtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"momtune.commands.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not built yet
            if exc.name != f"momtune.commands.{name}":
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MomtuneError as exc:
        print(f"momtune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"momtune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
