"""MBPP (Austin et al.) in its native row format.

Local ``path``: a JSONL (the original ``mbpp.jsonl``) or JSON file of rows with ``task_id``,
``text``, ``code``, ``test_list``, ``test_setup_code``. Without a path, the hub is used.
"""

from __future__ import annotations

import ast

from bdc.problems.assertions import split_assertions
from bdc.problems.format import Problem, Sample, split_tests
from bdc.problems.sources import SourceData, SourceError, local_or_hub


def entry_point(code: str, tests: list[str], where: str) -> str:
    """The tested function: the first function the tests call that the reference defines."""
    try:
        defined = {n.name for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)}
    except SyntaxError:
        defined = set()
    for test in tests:
        for node in ast.walk(ast.parse(test)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and (node.func.id in defined or not defined):
                return node.func.id
    raise SourceError(f"{where}: cannot tell which function test_list tests")


def load(min_tests: int = 1, limit: int | None = None, path: str | None = None,
         split: str = "test") -> SourceData:
    rows = local_or_hub(path, "google-research-datasets/mbpp", split, "full")
    data = SourceData()
    for index, row in enumerate(rows):
        where = row.get("_where", f"mbpp row {index}")
        for key in ("task_id", "text", "code", "test_list"):
            if key not in row:
                raise SourceError(f"{where}: missing field {key!r}")
        try:
            statements = [s for t in row["test_list"] for s in ast.parse(t).body]
        except SyntaxError as exc:
            raise SourceError(f"{where}: test_list has invalid Python: {exc}") from exc
        fn = entry_point(row["code"], row["test_list"], where)
        setup = [row["test_setup_code"]] if row.get("test_setup_code") else []
        tests = split_tests(split_assertions(statements, fn, setup), min_tests)
        if tests is None:
            data.dropped += 1
            continue
        pid = f"mbpp/{row['task_id']}"
        prompt = f"{row['text']}\n\n{row['test_list'][0]}\n"
        data.problems.append(Problem(id=pid, source="mbpp", prompt=prompt, kind="function",
                                     entry_point=fn, tests=tests,
                                     meta={"task_id": row["task_id"]}))
        data.references.append(Sample(problem_id=pid, program=row["code"]))
        if limit and len(data.problems) >= limit:
            break
    return data
