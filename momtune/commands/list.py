"""momtune list: the templates, search spaces and model presets this package knows."""
from __future__ import annotations

import argparse
from importlib import resources


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list templates, search spaces (with their shape sets) and presets")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tomllib

    from rich.console import Console
    from rich.table import Table

    from momtune.kernels import TEMPLATE_MODULES
    from momtune.reference.config import PRESETS

    console = Console()
    spaces = {f.name[:-5]: f for f in resources.files("momtune.search_spaces").iterdir() if f.name.endswith(".toml")}
    table = Table(title="templates and search spaces")
    for col in ("template", "module", "search space", "parameters", "shape sets"):
        table.add_column(col)
    for name in sorted(TEMPLATE_MODULES):
        f = spaces.get(name)
        params = sets = "-"
        if f is not None:
            data = tomllib.loads(f.read_text())
            params = ", ".join(data.get("parameters", {}))
            sets = ", ".join(data.get("shapes", {}))
        table.add_row(name, f"momtune.kernels.{TEMPLATE_MODULES[name]}", f.name if f else "(none)", params, sets)
    console.print(table)
    presets = Table(title="model presets (MoMConfig.from_preset)")
    for col in ("preset", "D", "layers", "H", "K", "E", "top-k", "shared"):
        presets.add_column(col)
    for name, kw in PRESETS.items():
        presets.add_row(name, str(kw["hidden_size"]), str(kw["num_hidden_layers"]), str(kw["num_heads"]),
                        str(kw["head_dim"]), str(kw["num_memories"]), str(kw["topk"]), str(kw["shared_mem"]))
    console.print(presets)
    return 0
