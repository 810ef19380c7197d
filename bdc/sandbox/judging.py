"""Comparison outside the program: a function test's value, a stdio test's lines, an
assertion snippet run here against proxies whose every call runs in the sandbox."""

from __future__ import annotations

import builtins
import logging
from collections import deque
from collections.abc import Callable

from bdc.problems.format import CallTest, CodeTest, Test
from bdc.sandbox.program import CallFailed, CallResult, ProgramProcess
from bdc.sandbox.results import TestOutcome

log = logging.getLogger(__name__)

def outputs_match(actual: str, expected: str) -> bool:
    """Stdio comparison: line by line, trailing spaces and trailing blank lines ignored."""
    def lines(text: str) -> list[str]:
        out = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
        while out and not out[-1]:
            out.pop()
        return out
    return lines(actual) == lines(expected)


def _as_json_data(value: object) -> object:
    """Tuples become lists: a JSON problem file cannot hold tuples."""
    if type(value) in (list, tuple):
        return [_as_json_data(v) for v in value]
    if type(value) is dict:
        return {k: _as_json_data(v) for k, v in value.items()}
    return value


def short(value: object, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def judge_call(test: CallTest, result: CallResult) -> TestOutcome:
    if result.status != "ok":
        return TestOutcome(result.status, detail=result.detail)
    if _as_json_data(result.value) == test.output:
        return TestOutcome("passed", actual=result.value)
    return TestOutcome("failed", actual=result.value,
                       detail=f"expected {short(test.output)}, got {short(result.value)}")


def judge_code(proc: ProgramProcess, test: CodeTest, entry_point: str | None) -> TestOutcome:
    def proxy(name: str) -> Callable:
        return lambda *args: proc.call(name, list(args))

    namespace: dict = {"__builtins__": builtins, "__name__": "__check__"}
    namespace.update({name: proxy(name) for name in proc.names})
    if entry_point:
        namespace["candidate"] = proxy(entry_point)
    try:
        exec(compile(test.code, "<test>", "exec"), namespace)
    except CallFailed as exc:
        return TestOutcome(exc.status, detail=exc.detail)
    except AssertionError as exc:
        return TestOutcome("failed", detail=f"assertion failed {exc}".strip())
    except Exception as exc:  # noqa: BLE001 - the check rejected the program's values
        return TestOutcome("failed", detail=f"{type(exc).__name__}: {exc}")
    return TestOutcome("passed")


def leading_calls(tests: deque[Test]) -> list[CallTest]:
    batch = []
    for test in tests:
        if not isinstance(test, CallTest):
            break
        batch.append(test)
    return batch
