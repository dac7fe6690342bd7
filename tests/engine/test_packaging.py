"""Packaging: the wheel's package list is discovered from the checkout (setup.py), the declared
Python floor is the one the code needs, and the CLI refuses to run with a subcommand module
missing (a broken install) instead of dropping the subcommand. The wheel itself is built,
installed and run outside the checkout by ``.ci/wheel_check.sh``."""
from __future__ import annotations

import ast
import os
import re
import fnmatch
import importlib
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.specifiers import SpecifierSet

from momtune import cli

ROOT = Path(__file__).resolve().parents[2]
FLOOR = (3, 11)  # tomllib; CI runs this version
ROOTS = {"momtune": "momtune", "momtune.reference": "reference", "momtune.kernels": "kernels",
         "momtune.search_spaces": "search_spaces"}


def _setup_py() -> ModuleType:
    """setup.py as a module (not as __main__, so it defines discover_packages and builds nothing)."""
    spec = importlib.util.spec_from_file_location("momtune_setup_py", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _init_folders(root: Path) -> set[str]:
    """Dotted installed name of every folder with an __init__.py under the four source roots."""
    names = set()
    for package, folder in ROOTS.items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            names.add(".".join((package, *rel)))
    return names


def _tree(root: Path, files: list[str]) -> Path:
    for f in ["momtune/__init__.py", "reference/__init__.py", "kernels/__init__.py",
              "search_spaces/__init__.py", *files]:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("")
    return root


def test_discovered_packages_are_the_init_folders() -> None:
    packages, package_dir = _setup_py().discover_packages()
    assert packages == sorted(_init_folders(ROOT))
    assert {"momtune.commands", "momtune.report", "momtune.kernels.norm", "momtune.reference",
            "momtune.search_spaces"} <= set(packages)
    assert package_dir == ROOTS


def test_new_subpackages_are_discovered(tmp_path: Path) -> None:
    root = _tree(tmp_path, ["momtune/newsub/__init__.py", "momtune/newsub/deep/__init__.py",
                            "kernels/newop/__init__.py", "kernels/newop/template.py"])
    packages, _ = _setup_py().discover_packages(root)
    assert packages == ["momtune", "momtune.kernels", "momtune.kernels.newop", "momtune.newsub",
                        "momtune.newsub.deep", "momtune.reference", "momtune.search_spaces"]


@pytest.mark.parametrize("folder", ["kernels/newop", "momtune/report/sub"])
def test_python_folder_without_init_is_refused(tmp_path: Path, folder: str) -> None:
    root = _tree(tmp_path, ["momtune/report/__init__.py", f"{folder}/kernel.py"])
    with pytest.raises(SystemExit, match=f"{folder}/ holds Python files but no __init__.py"):
        _setup_py().discover_packages(root)


def test_pyproject_leaves_the_package_list_to_setup_py() -> None:
    tool = _pyproject()["tool"]["setuptools"]
    assert "packages" not in tool and "package-dir" not in tool, "pyproject.toml lists packages by hand"
    patterns = tool["package-data"]["momtune.search_spaces"]
    spaces = sorted(p.name for p in (ROOT / "search_spaces").glob("*.toml"))
    assert len(spaces) >= 7
    assert [s for s in spaces if not any(fnmatch.fnmatch(s, pat) for pat in patterns)] == []


def test_requires_python_is_the_floor() -> None:
    spec = SpecifierSet(_pyproject()["project"]["requires-python"])
    floor = "{}.{}".format(*FLOOR)
    below = "{}.{}".format(FLOOR[0], FLOOR[1] - 1)
    assert floor in spec and below not in spec, f"requires-python {spec} is not >={floor}"
    assert "{}.{}".format(*sys.version_info[:2]) in spec


def test_sources_need_no_python_above_the_floor() -> None:
    """Every source of the wheel parses as Python 3.11 (``type`` statements, PEP 695 generics and
    the like would not); the floor is also no lower than the code needs (tomllib: 3.11)."""
    sources = [p for folder in ROOTS.values() for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(sources) > 50
    for path in sources:
        ast.parse(path.read_text(), filename=str(path), feature_version=FLOOR)
    assert any("import tomllib" in p.read_text() for p in sources) and FLOOR >= (3, 11)


@pytest.mark.parametrize("missing", ["momtune.commands.ghost", "momtune.commands"])
def test_cli_fails_loudly_on_a_missing_command_module(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], missing: str) -> None:
    real = importlib.import_module

    def import_module(name: str, package: str | None = None) -> ModuleType:
        if name == "momtune.commands.ghost" or (missing == "momtune.commands" and name.startswith(missing)):
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real(name, package)

    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "ghost"))
    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert f"module {missing} is missing" in err and "broken" in err


def test_cli_lets_a_missing_dependency_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command module whose own import fails is not a missing command: its error shows as it is."""
    def import_module(name: str, package: str | None = None) -> ModuleType:
        raise ModuleNotFoundError("No module named 'optuna'", name="optuna")

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    with pytest.raises(ModuleNotFoundError, match="optuna"):
        cli.main(["list"])


def test_cli_process_exits_non_zero_on_a_missing_command_module() -> None:
    code = ("import sys, momtune.cli as c; c.COMMANDS = (*c.COMMANDS, 'ghost'); "
            "sys.exit(c.main(['--help']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc
    assert "momtune: error: subcommand 'ghost': module momtune.commands.ghost is missing" in proc.stderr
    assert proc.stdout == ""


def test_the_model_needs_none_of_the_tuning_and_report_packages() -> None:
    """`pip install momtune` (no extras) runs the fast model: its path imports no optuna, rich,
    matplotlib or SQLAlchemy (issue 13, item 4). Imports of them are made to fail, then the LM
    is built, run and made to generate in the interpreter."""
    code = ("import sys\n"
            "for m in ('optuna', 'rich', 'matplotlib', 'sqlalchemy'): sys.modules[m] = None\n"
            "import torch\n"
            "from momtune import MoMForCausalLM\n"
            "from momtune.reference.config import MoMConfig\n"
            "cfg = MoMConfig.from_preset('tiny')\n"
            "model = MoMForCausalLM(cfg, backend='triton').eval()\n"
            "with torch.no_grad():\n"
            "    out = model.generate(torch.randint(0, cfg.vocab_size, (2, 5)), max_new_tokens=3)\n"
            "print(tuple(out.shape))\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(2, 8)"


def test_a_command_without_its_extra_says_which_to_install() -> None:
    code = ("import sys\nsys.modules['optuna'] = None\nfrom momtune.cli import main\n"
            "sys.exit(main(['export', '--storage', 'sqlite:///nowhere.db', '--out', 'x.json']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert "needs optuna" in proc.stderr and "pip install 'momtune[tune]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_extras_hold_what_the_base_leaves_out() -> None:
    meta = _pyproject()["project"]
    base = {re.split(r"[<>=\[ ]", d)[0] for d in meta["dependencies"]}
    assert base == {"torch", "triton", "numpy"}
    extras = {k: {re.split(r"[<>=\[ ]", d)[0] for d in v} for k, v in meta["optional-dependencies"].items()}
    assert {"optuna", "rich"} <= extras["tune"] and {"optuna", "rich", "matplotlib"} <= extras["report"]
    assert extras["report"] <= extras["all"] and extras["tune"] <= extras["all"]
    assert extras["all"] <= extras["test"] | {"psycopg2-binary"}
