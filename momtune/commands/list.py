"""momtune list: the templates, search spaces and model presets this package knows."""
from __future__ import annotations

import argparse
from importlib import resources


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list templates, search spaces (with their shape sets) and presets")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(func=run)


def collect() -> dict[str, list[dict]]:
    import tomllib

    from momtune.kernels import TEMPLATE_MODULES
    from momtune.reference.config import PRESETS

    spaces = {f.name[:-5]: f for f in resources.files("momtune.search_spaces").iterdir() if f.name.endswith(".toml")}
    templates = []
    for name in sorted(TEMPLATE_MODULES):
        f = spaces.get(name)
        data = tomllib.loads(f.read_text()) if f is not None else {}
        templates.append({"template": name, "module": f"momtune.kernels.{TEMPLATE_MODULES[name]}",
                          "search_space": f.name if f is not None else None,
                          "parameters": list(data.get("parameters", {})), "shape_sets": list(data.get("shapes", {}))})
    presets = [{"preset": name, "D": kw["hidden_size"], "layers": kw["num_hidden_layers"], "H": kw["num_heads"],
                "K": kw["head_dim"], "E": kw["num_memories"], "top-k": kw["topk"], "shared": kw["shared_mem"]}
               for name, kw in PRESETS.items()]
    return {"templates": templates, "presets": presets}


def _cell(v: object) -> str:
    if v is None:
        return "-"
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    data = collect()
    titles = {"templates": "templates and search spaces", "presets": "model presets (MoMConfig.from_preset)"}
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    if not sys.stdout.isatty():  # piped: whole values, tab-separated, nothing cut to a terminal's width
        for key, rows in data.items():
            print(f"# {titles[key]}")
            print("\t".join(rows[0]))
            for row in rows:
                print("\t".join(_cell(v) for v in row.values()))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for key, rows in data.items():
        table = Table(title=titles[key])
        for col in rows[0]:
            table.add_column(col.replace("_", " "))
        for row in rows:
            table.add_row(*(_cell(v) for v in row.values()))
        console.print(table)
    return 0
