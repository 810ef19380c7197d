"""Turn assertion-style checks (HumanEval ``check``, MBPP ``test_list``) into tests.

An ``assert f(literal args) == literal`` becomes a call test when both sides survive a JSON
round trip unchanged (so the comparison the host makes is the one the original made);
anything else stays an assertion snippet, with the setup statements it depends on.
"""

from __future__ import annotations

import ast
import math

from bdc.problems.format import CallTest, CodeTest, Test


def json_exact(value: object) -> bool:
    """True when JSON stores ``value`` without changing its type (no tuples, sets, nan)."""
    t = type(value)
    if value is None or t in (bool, int, str):
        return True
    if t is float:
        return math.isfinite(value)
    if t is list:
        return all(json_exact(v) for v in value)
    if t is dict:
        return all(type(k) is str and json_exact(v) for k, v in value.items())
    return False


def _literal(node: ast.expr) -> tuple[bool, object]:
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None
    return json_exact(value), value


def as_call_test(stmt: ast.stmt, callee: str) -> CallTest | None:
    """``assert callee(a, b) == expected`` (either side) as a call test, if faithful."""
    if not isinstance(stmt, ast.Assert):
        return None
    test = stmt.test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return None
    for call, other in ((test.left, test.comparators[0]), (test.comparators[0], test.left)):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                and call.func.id == callee and not call.keywords
                and not any(isinstance(a, ast.Starred) for a in call.args)):
            args = [_literal(a) for a in call.args]
            ok, expected = _literal(other)
            if ok and all(a_ok for a_ok, _ in args):
                return CallTest(input=[v for _, v in args], output=expected)
    return None


def _contains_assert(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Assert) for n in ast.walk(node))


def _is_placeholder(stmt: ast.stmt) -> bool:
    """``assert True, "..."``: HumanEval's debugging markers test nothing."""
    return isinstance(stmt, ast.Assert) and isinstance(stmt.test, ast.Constant) \
        and stmt.test.value is True


def split_assertions(statements: list[ast.stmt], callee: str,
                     setup: list[str] | None = None) -> list[Test]:
    """One test per top-level assertion (or per loop of assertions), in order."""
    prefix = list(setup or [])
    tests: list[Test] = []
    for stmt in statements:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring or bare constant
        if _is_placeholder(stmt):
            continue
        if not _contains_assert(stmt):
            prefix.append(ast.unparse(stmt))
            continue
        call = as_call_test(stmt, callee)
        tests.append(call or CodeTest(code="\n".join([*prefix, ast.unparse(stmt)])))
    return tests
