"""The ``momtune`` command line. Each subcommand lives in ``momtune/commands/<name>.py`` and
exposes ``register(subparsers)`` (adds its parser, with help text, and sets ``func``)."""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from . import __version__
from .errors import MomtuneError

COMMANDS = ("search", "export", "verify", "bench", "report", "list")
# optional packages (pyproject's extras): the model runs without them, commands may need them
EXTRAS = {"optuna": "tune", "sqlalchemy": "tune", "rich": "tune", "matplotlib": "report"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="momtune",
        description="Autotune, validate and export Triton kernels for Mixture-of-Memories linear attention.",
    )
    parser.add_argument("--version", action="version", version=f"momtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        load_command(name).register(sub)
    return parser


def load_command(name: str) -> ModuleType:
    """Import ``momtune.commands.<name>``. Its module (or the ``momtune.commands`` package) missing
    means a broken install, which raises :class:`MomtuneError` naming it; any other import error,
    e.g. a missing dependency of the module, propagates as it is."""
    module = f"momtune.commands.{name}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name not in (module, "momtune.commands"):
            raise
        raise MomtuneError(f"subcommand {name!r}: module {exc.name} is missing, so this momtune install is "
                           f"broken; reinstall momtune (from a checkout: pip install -e .)") from exc


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except MomtuneError as exc:
        print(f"momtune: error: {exc}", file=sys.stderr)
        return 2
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
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        print(f"momtune {args.command}: error: needs {top}, which `pip install momtune` leaves out; "
              f"install it with `pip install 'momtune[{EXTRAS[top]}]'`", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `momtune ... | head`: the reader left; not an error of ours
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would raise again
        return 141


if __name__ == "__main__":
    sys.exit(main())
