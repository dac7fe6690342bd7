"""Build script: which packages ship in the wheel and where their sources live.

The metadata is in ``pyproject.toml``; this file only computes the package list, since the one
installed package ``momtune`` is spread over four folders of the checkout (see ``PACKAGE_ROOTS``).
The list is discovered (every folder with an ``__init__.py`` under a root), so a new subpackage,
e.g. ``momtune/<sub>/`` or ``kernels/<op>/``, ships without editing a list here.
"""
from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent

# installed package -> folder of the checkout that holds its source
PACKAGE_ROOTS: dict[str, str] = {
    "momtune": "momtune",
    "momtune.reference": "reference",
    "momtune.kernels": "kernels",
    "momtune.search_spaces": "search_spaces",
}


def discover_packages(root: Path = HERE) -> tuple[list[str], dict[str, str]]:
    """``(packages, package_dir)`` for ``setup()``: each root and its subpackages, dotted.

    A folder under a root that holds ``.py`` files but no ``__init__.py`` would import from a
    checkout (as a namespace package) yet be left out of the wheel: that raises, naming it.
    """
    packages: list[str] = []
    for name, folder in PACKAGE_ROOTS.items():
        base = root / folder
        if not (base / "__init__.py").is_file():
            raise SystemExit(f"setup.py: {folder}/__init__.py is missing (the source of package {name})")
        packages.append(name)
        packages.extend(f"{name}.{sub}" for sub in find_packages(str(base)))
        for path in sorted(base.rglob("*.py")):
            if not (path.parent / "__init__.py").is_file():
                rel = path.parent.relative_to(root).as_posix()
                raise SystemExit(f"setup.py: {rel}/ holds Python files but no __init__.py, so it would not "
                                 f"ship in the wheel; add {rel}/__init__.py")
    return sorted(packages), dict(PACKAGE_ROOTS)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import discover_packages
    packages, package_dir = discover_packages()
    setup(packages=packages, package_dir=package_dir)
