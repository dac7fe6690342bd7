"""Search spaces: ``search_spaces/<template>.toml`` loaded, typed and validated.

Format (docs/CONVENTIONS.md)::

    [template]            name, description
    [parameters.NAME]     choices = [...] (non-empty, one type), default (one of the choices)
    [[constraints]]       expr = "BV <= V", why = "..."
    [shapes.SET]          dtype = "float32", shapes = [{N = 37, ...}, ...]

Every problem raises :class:`~momtune.errors.SearchSpaceError` naming the file and the key.
Constraint expressions are parsed with :mod:`ast` and only a safe subset is accepted: names,
numbers, comparisons, ``and``/``or``/``not``, arithmetic and calls of ``min``/``max``. Their cost
is bounded (:mod:`momtune.bounded`): a short expression, arithmetic on numbers only, no power in
an exponent, no integer past ``MAX_INT_BITS`` bits (refused before it is computed); a breach is an
error naming the file and the constraint (``BLOCK ** (V ** 99)`` hung the search).
"""
from __future__ import annotations

import ast
import itertools
import json
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from . import bounded
from .errors import SearchSpaceError

Config = dict[str, Any]
Shape = dict[str, int]

TOP_LEVEL = ("template", "parameters", "constraints", "shapes", "starts")
TEMPLATE_FIELDS = ("name", "description")
PARAMETER_FIELDS = ("choices", "default", "description")
CONSTRAINT_FIELDS = ("expr", "why")
SHAPE_SET_FIELDS = ("dtype", "shapes", "description")
DTYPES = ("float64", "float32", "float16", "bfloat16")
REQUIRED_SETS = ("tiny",)
_FUNCS = {"min": min, "max": max}
_NODES = (
    ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd,
    ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
    ast.Compare, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
    ast.Name, ast.Load, ast.Constant, ast.Call,
)


def canonical(config: Mapping[str, Any]) -> str:
    """The canonical JSON string of a config (sorted keys): identity and tie-break order."""
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"))


class ShapeSet(NamedTuple):
    dtype: str
    shapes: list[Shape]


@dataclass(frozen=True)
class Parameter:
    name: str
    choices: tuple[Any, ...]
    default: Any


@dataclass(frozen=True)
class Constraint:
    expr: str
    why: str
    names: frozenset[str]
    code: Any = field(repr=False, compare=False)
    where: str = field(default="", compare=False)  # the file and key, for errors
    key: str = field(default="", compare=False)

    def holds(self, env: Mapping[str, Any]) -> bool:
        scope = {**env, "__builtins__": {}, **_FUNCS, bounded.ARITH: bounded.arith}
        try:
            return bool(eval(self.code, scope))  # the AST is checked and its arithmetic bounded
        except bounded.Unbounded as exc:
            at = ", ".join(f"{k}={env[k]!r}" for k in sorted(self.names) if k in env)
            raise SearchSpaceError(f"{self.where}: {self.key}.expr: {self.expr!r} at {at}: {exc}; constraint "
                                   f"arithmetic is limited to numbers and integers below "
                                   f"2**{bounded.MAX_INT_BITS}") from None


@dataclass
class SearchSpace:
    """A validated search space of one template."""

    name: str
    path: str
    description: str
    parameters: dict[str, Parameter]
    constraints: list[Constraint]
    shape_sets: dict[str, ShapeSet]
    shape_keys: tuple[str, ...]
    check_config: Any = None  # template.check_config(shape, config) -> problem string, or None
    # configs known to be good somewhere ([[starts]]: parameters not named keep their default):
    # pattern search measures them right after the default, before any neighbour
    starts: list[Config] = field(default_factory=list)

    def default_config(self) -> Config:
        return {p.name: p.default for p in self.parameters.values()}

    def all_configs(self) -> Iterator[Config]:
        names = list(self.parameters)
        for values in itertools.product(*(self.parameters[n].choices for n in names)):
            yield dict(zip(names, values))

    def is_valid(self, config: Mapping[str, Any], shape: Mapping[str, int] | None = None) -> tuple[bool, str]:
        """(True, "") or (False, why) for a config on a shape (None: parameter-only constraints)."""
        unknown = [k for k in config if k not in self.parameters]
        if unknown:
            return False, f"unknown parameters {unknown}"
        for p in self.parameters.values():
            if p.name not in config:
                return False, f"parameter {p.name!r} missing"
            if config[p.name] not in p.choices:
                return False, f"{p.name}={config[p.name]!r} is not one of {list(p.choices)}"
        env: dict[str, Any] = {**(shape or {}), **config}
        for c in self.constraints:
            if shape is None and not c.names <= set(self.parameters):
                continue
            try:
                ok = c.holds(env)
            except (ArithmeticError, TypeError, NameError) as exc:
                return False, f"constraint {c.expr!r} cannot be evaluated: {exc}"
            if not ok:
                return False, f"{c.why} ({c.expr})" if c.why else c.expr
        if shape is not None and self.check_config is not None:
            problem = self.check_config(shape, dict(config))
            if problem:
                return False, str(problem)
        return True, ""

    def enumerate(self, shape: Mapping[str, int] | None = None) -> list[Config]:
        """All valid configs for a shape, in parameter-product order."""
        return [c for c in self.all_configs() if self.is_valid(c, shape)[0]]

    def size(self, shape: Mapping[str, int] | None = None) -> int:
        return len(self.enumerate(shape))


def space_names(directory: str | Path | None = None) -> list[str]:
    """Names of the search spaces found (``*.toml`` stems) in the package or a directory."""
    root = Path(directory) if directory is not None else resources.files("momtune.search_spaces")
    if directory is not None and not Path(directory).is_dir():
        raise SearchSpaceError(f"--space-dir {directory}: no such folder")
    return sorted(f.name[:-5] for f in root.iterdir() if f.name.endswith(".toml"))


def load_space(name: str, directory: str | Path | None = None, template: Any = None, *,
               check: bool = True) -> SearchSpace:
    """Load and validate ``<name>.toml`` from ``momtune.search_spaces`` or ``directory``.

    ``template`` (a Template, optional) supplies ``shape_keys`` and ``check_config``; without it the
    registered template of that name is used when it can be imported, else the keys of the shape sets.
    ``check=False`` skips the satisfiability checks (every constraint and shape set admits a
    config), which enumerate the space: for run-time lookups of a space already searched.
    """
    if directory is not None:
        if not Path(directory).is_dir():
            raise SearchSpaceError(f"--space-dir {directory}: no such folder")
        path = Path(directory) / f"{name}.toml"
        if not path.is_file():
            raise SearchSpaceError(f"{path}: no search space for template {name!r} (known: {space_names(directory)})")
        text, where = path.read_text(), str(path)
    else:
        res = resources.files("momtune.search_spaces") / f"{name}.toml"
        if not res.is_file():
            raise SearchSpaceError(f"search_spaces/{name}.toml: no search space for template {name!r} "
                                   f"(known: {space_names()})")
        text, where = res.read_text(), f"search_spaces/{name}.toml"
    if template is None:
        template = _registered_template(name)
    shape_keys = tuple(template.shape_keys) if template is not None else None
    check_fn = getattr(template, "check_config", None) if template is not None else None
    return parse_space(text, where, name=name, shape_keys=shape_keys, check_config=check_fn, check=check)


def find_space(name: str, directory: str | Path | None = None, template: Any = None, *,
               check: bool = True) -> SearchSpace | None:
    """The search space of template ``name``: ``directory``'s ``<name>.toml`` if it has one, else
    momtune's own, else None (a template momtune does not ship, and no ``directory`` holding it)."""
    if directory is not None and not Path(directory).is_dir():
        raise SearchSpaceError(f"--space-dir {directory}: no such folder")
    if directory is not None and (Path(directory) / f"{name}.toml").is_file():
        return load_space(name, directory, template, check=check)
    if (resources.files("momtune.search_spaces") / f"{name}.toml").is_file():
        return load_space(name, None, template, check=check)
    return None


def _registered_template(name: str) -> Any:
    try:
        from momtune.kernels import TEMPLATE_MODULES, get_template

        return get_template(name) if name in TEMPLATE_MODULES else None
    except ImportError:  # the template module is not written yet
        return None


def parse_space(text: str, where: str, *, name: str | None = None, shape_keys: Sequence[str] | None = None,
                check_config: Any = None, check: bool = True) -> SearchSpace:
    """Parse and validate the TOML text of a search space (``where`` names it in errors)."""

    def fail(key: str, msg: str) -> SearchSpaceError:
        return SearchSpaceError(f"{where}: {key}: {msg}")

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SearchSpaceError(f"{where}: not valid TOML: {exc}") from None
    _no_unknown(data, TOP_LEVEL, "", fail)
    tmpl = _table(data.get("template", {}), "template", fail)
    _no_unknown(tmpl, TEMPLATE_FIELDS, "template.", fail)
    space_name = tmpl.get("name", name)
    if not isinstance(space_name, str) or not space_name:
        raise fail("template.name", "missing or not a string")
    if name is not None and space_name != name:
        raise fail("template.name", f"{space_name!r} does not match the file name {name!r}")

    params = _parse_parameters(_table(data.get("parameters"), "parameters", fail), fail)
    sets = _parse_shape_sets(_table(data.get("shapes"), "shapes", fail), shape_keys, fail)
    keys = tuple(shape_keys) if shape_keys is not None else tuple(
        dict.fromkeys(k for s in sets.values() for shp in s.shapes for k in shp))
    clash = sorted(set(params) & set(keys))
    if clash:
        raise fail(f"parameters.{clash[0]}", "a parameter cannot have the name of a shape key")
    raw_constraints = data.get("constraints", [])
    if not isinstance(raw_constraints, list):
        raise fail("constraints", "must be an array of tables ([[constraints]])")
    constraints = [_parse_constraint(c, i, set(params) | set(keys), fail, where)
                   for i, c in enumerate(raw_constraints)]
    space = SearchSpace(space_name, where, str(tmpl.get("description", "")), params, constraints, sets, keys,
                        check_config, _parse_starts(data.get("starts", []), params, fail))
    if check:
        _check_satisfiable(space, fail)
    return space


def _table(value: Any, key: str, fail: Any) -> dict[str, Any]:
    if value is None:
        raise fail(key, "missing")
    if not isinstance(value, dict):
        raise fail(key, f"must be a table, got {type(value).__name__}")
    return value


def _no_unknown(table: Mapping[str, Any], known: Sequence[str], prefix: str, fail: Any) -> None:
    for key in table:
        if key not in known:
            raise fail(f"{prefix}{key}", f"unknown key; accepted: {', '.join(known)}")


def _kind(value: Any) -> str:
    return "bool" if isinstance(value, bool) else type(value).__name__


def _parse_parameters(table: dict[str, Any], fail: Any) -> dict[str, Parameter]:
    if not table:
        raise fail("parameters", "no parameters defined")
    params: dict[str, Parameter] = {}
    for pname, spec in table.items():
        key = f"parameters.{pname}"
        if not pname.isidentifier():
            raise fail(key, "parameter names must be identifiers")
        spec = _table(spec, key, fail)
        _no_unknown(spec, PARAMETER_FIELDS, f"{key}.", fail)
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"{key}.choices", "must be a non-empty list")
        kinds = {_kind(c) for c in choices}
        if not kinds <= {"int", "float", "str", "bool"}:
            raise fail(f"{key}.choices", f"only ints, floats, strings or bools are accepted, got {sorted(kinds)}")
        if len(kinds) > 1:
            raise fail(f"{key}.choices", f"mixed types {sorted(kinds)}; use one type")
        if len(set(choices)) != len(choices):
            raise fail(f"{key}.choices", f"repeated values in {choices}")
        if "default" not in spec:
            raise fail(f"{key}.default", "missing")
        default = spec["default"]
        if _kind(default) != _kind(choices[0]) or default not in choices:
            raise fail(f"{key}.default", f"{default!r} is not one of the choices {choices}")
        params[pname] = Parameter(pname, tuple(choices), default)
    return params


def _parse_shape_sets(table: dict[str, Any], shape_keys: Sequence[str] | None, fail: Any) -> dict[str, ShapeSet]:
    for req in REQUIRED_SETS:
        if req not in table:
            raise fail(f"shapes.{req}", "missing (every search space needs a 'tiny' set for the CPU interpreter)")
    sets: dict[str, ShapeSet] = {}
    for sname, spec in table.items():
        key = f"shapes.{sname}"
        spec = _table(spec, key, fail)
        _no_unknown(spec, SHAPE_SET_FIELDS, f"{key}.", fail)
        dtype = spec.get("dtype")
        if dtype not in DTYPES:
            raise fail(f"{key}.dtype", f"{dtype!r} is not accepted; use one of {', '.join(DTYPES)}")
        shapes = spec.get("shapes")
        if not isinstance(shapes, list) or not shapes:
            raise fail(f"{key}.shapes", "must be a non-empty list of shape tables")
        out: list[Shape] = []
        for i, shp in enumerate(shapes):
            skey = f"{key}.shapes[{i}]"
            if not isinstance(shp, dict):
                raise fail(skey, "must be a table like { N = 37, H = 2 }")
            if shape_keys is not None:
                unknown = [k for k in shp if k not in shape_keys]
                if unknown:
                    raise fail(f"{skey}.{unknown[0]}", f"unknown shape key; the template's keys are {list(shape_keys)}")
                missing = [k for k in shape_keys if k not in shp]
                if missing:
                    raise fail(skey, f"missing shape keys {missing}")
                shp = {k: shp[k] for k in shape_keys}
            for k, v in shp.items():
                if _kind(v) != "int" or v < 0:
                    raise fail(f"{skey}.{k}", f"must be a non-negative integer, got {v!r}")
            out.append(dict(shp))
        sets[sname] = ShapeSet(dtype, out)
    return sets


def _parse_starts(raw: Any, params: Mapping[str, Parameter], fail: Any) -> list[Config]:
    """[[starts]]: each a table of parameter values (plus an optional ``why``), completed with the
    defaults; a name that is no parameter or a value that is no choice is refused."""
    if not isinstance(raw, list):
        raise fail("starts", "must be an array of tables ([[starts]])")
    out: list[Config] = []
    for i, entry in enumerate(raw):
        key = f"starts[{i}]"
        entry = _table(entry, key, fail)
        cfg = {p.name: p.default for p in params.values()}
        for name, value in entry.items():
            if name == "why":
                if not isinstance(value, str):
                    raise fail(f"{key}.why", "must be a string")
                continue
            if name not in params:
                raise fail(f"{key}.{name}", f"not a parameter; parameters: {', '.join(params)}")
            if value not in params[name].choices or isinstance(value, bool) != isinstance(params[name].choices[0], bool):
                raise fail(f"{key}.{name}", f"{value!r} is not one of {list(params[name].choices)}")
            cfg[name] = value
        out.append(cfg)
    return out


def _parse_constraint(raw: Any, i: int, names: set[str], fail: Any, where: str = "") -> Constraint:
    key = f"constraints[{i}]"
    raw = _table(raw, key, fail)
    _no_unknown(raw, CONSTRAINT_FIELDS, f"{key}.", fail)
    expr = raw.get("expr")
    if not isinstance(expr, str) or not expr.strip():
        raise fail(f"{key}.expr", "missing or not a string")
    why = raw.get("why", "")
    if not isinstance(why, str):
        raise fail(f"{key}.why", "must be a string")
    if len(expr) > bounded.MAX_EXPR_CHARS:
        raise fail(f"{key}.expr", f"{len(expr)} characters; a constraint has at most {bounded.MAX_EXPR_CHARS}")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise fail(f"{key}.expr", f"{expr!r} does not parse: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise fail(f"{key}.expr", f"{expr!r} does not parse: {type(exc).__name__}") from None
    used: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, _NODES):
            raise fail(f"{key}.expr", f"{expr!r}: {type(node).__name__} is not allowed (only names, numbers, "
                       "comparisons, and/or/not, arithmetic, min/max)")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise fail(f"{key}.expr", f"{expr!r}: calling a {type(node.func).__name__} is not allowed "
                           "(only min(...) and max(...) calls)")
            if node.func.id not in _FUNCS or node.keywords:
                raise fail(f"{key}.expr", f"{expr!r}: only min(...) and max(...) calls are allowed")
        elif isinstance(node, ast.Constant) and _kind(node.value) not in ("int", "float", "str", "bool"):
            raise fail(f"{key}.expr", f"{expr!r}: constant {node.value!r} is not allowed")
        elif isinstance(node, ast.Name) and not (node.id in _FUNCS and _is_callee(tree, node)):
            used.add(node.id)
        problem = bounded.static_problem(node)
        if problem:
            raise fail(f"{key}.expr", f"{expr!r}: {problem}")
    unknown = sorted(used - names)
    if unknown:
        raise fail(f"{key}.expr", f"{expr!r} uses unknown names {unknown}; known: {sorted(names)}")
    try:
        code = compile(bounded.guard(tree), f"<{key}>", "eval")
    except (RecursionError, MemoryError, ValueError) as exc:
        raise fail(f"{key}.expr", f"{expr!r} cannot be compiled: {type(exc).__name__}") from None
    return Constraint(expr, why, frozenset(used), code, where, key)


def _is_callee(tree: ast.AST, name: ast.Name) -> bool:
    return any(isinstance(n, ast.Call) and n.func is name for n in ast.walk(tree))


def _check_satisfiable(space: SearchSpace, fail: Any) -> None:
    params = set(space.parameters)
    configs = list(space.all_configs())
    local = [c for c in space.constraints if c.names <= params]
    for c in local:
        if not any(_safe_holds(c, cfg) for cfg in configs):
            raise fail(f"constraints[{space.constraints.index(c)}].expr",
                       f"{c.expr!r} excludes every config of the parameters' choices")
    if local and not any(space.is_valid(cfg)[0] for cfg in configs):
        raise fail("constraints", "the parameter-only constraints together exclude every config")
    for sname, sset in space.shape_sets.items():
        for i, shape in enumerate(sset.shapes):
            if not any(space.is_valid(cfg, shape)[0] for cfg in configs):
                why = space.is_valid(space.default_config(), shape)[1]
                raise fail(f"shapes.{sname}.shapes[{i}]",
                           f"no config is valid for shape {shape} (e.g. the default: {why})")


def _safe_holds(c: Constraint, env: Mapping[str, Any]) -> bool:
    try:
        return c.holds(env)
    except (ArithmeticError, TypeError, NameError):
        return False
