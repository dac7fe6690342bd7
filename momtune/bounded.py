"""Bounded arithmetic for the constraint expressions of search spaces (:mod:`momtune.space`).

A constraint's binary operators are rewritten (:func:`guard`) into calls of :func:`arith`, which
takes numbers only and refuses, before computing it, an integer that would pass ``MAX_INT_BITS``
bits; :func:`static_problem` refuses at parse time what is unbounded by construction (a power in
an exponent, arithmetic on a string, a huge constant). With expressions of at most
``MAX_EXPR_CHARS`` characters, evaluating a constraint costs little whatever its inputs.
"""
from __future__ import annotations

import ast
import operator
from typing import Any

MAX_INT_BITS = 256  # constraint arithmetic: integers below 2**256 in magnitude
MAX_EXPR_CHARS = 1000
ARITH = "_momtune_arith_"  # the bounded arithmetic every binary operator of a constraint calls
_OPS: dict[type, str] = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
                         ast.Mod: "%", ast.Pow: "**"}
_BINOPS: dict[str, Any] = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
                           "//": operator.floordiv, "%": operator.mod, "**": operator.pow}


class Unbounded(Exception):
    """A constraint's arithmetic would leave the bounds (MAX_INT_BITS) or is not on numbers."""


def _bits(x: int) -> int:
    return abs(int(x)).bit_length()


def _show(x: Any) -> str:
    return f"<an integer of {_bits(x)} bits>" if isinstance(x, int) and _bits(x) > 64 else repr(x)


def arith(op: str, a: Any, b: Any) -> Any:
    """``a op b`` for numbers, refused before the work when an integer result would pass
    MAX_INT_BITS (so the cost of every operation is bounded)."""
    for x in (a, b):
        if not isinstance(x, (int, float)):
            raise Unbounded(f"{op!r} on {type(x).__name__} {x!r}: arithmetic takes numbers only")
    if isinstance(a, int) and isinstance(b, int):
        if op == "*" and _bits(a) + _bits(b) - 1 > MAX_INT_BITS:
            raise Unbounded(f"{_show(a)} * {_show(b)} has more than {MAX_INT_BITS} bits")
        if op == "**" and b > 0 and abs(a) > 1 and (_bits(a) - 1) * b >= MAX_INT_BITS:
            raise Unbounded(f"{_show(a)} ** {_show(b)} has more than {MAX_INT_BITS} bits")
    result = _BINOPS[op](a, b)
    if isinstance(result, int) and _bits(result) > MAX_INT_BITS:
        raise Unbounded(f"{_show(a)} {op} {_show(b)} has more than {MAX_INT_BITS} bits")
    return result


def static_problem(node: ast.AST) -> str | None:
    """Why one node of a constraint's AST is unbounded by construction, or None."""
    if isinstance(node, ast.Constant) and type(node.value) is int and _bits(node.value) > MAX_INT_BITS:
        return f"constant of {_bits(node.value)} bits; integers must stay below 2**{MAX_INT_BITS}"
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        operands = [node.left, node.right] if isinstance(node, ast.BinOp) else [node.operand]
        if any(isinstance(o, ast.Constant) and isinstance(o.value, str) for o in operands):
            return "arithmetic on a string is not allowed (strings can only be compared: STATES == 'memory')"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and any(
                isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) for n in ast.walk(node.right)):
            return (f"a power in an exponent ({ast.unparse(node)}) is not allowed: its cost is unbounded "
                    "(exponents: a name or a number, e.g. 2 ** LOG_B)")
    return None


def guard(tree: ast.Expression) -> ast.Expression:
    """``tree`` with every binary operator a call of :func:`arith` (named ``ARITH`` in the scope)."""
    return ast.fix_missing_locations(_Guard().visit(tree))


class _Guard(ast.NodeTransformer):
    """Every binary operator becomes a call of the bounded :func:`arith`."""

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        call = ast.Call(ast.Name(ARITH, ast.Load()), [ast.Constant(_OPS[type(node.op)]), node.left, node.right], [])
        return ast.copy_location(call, node)
