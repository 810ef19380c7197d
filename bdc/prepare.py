"""Stage ``prepare``: configured problem sources -> ``explore`` and ``test`` problem files.

The explore pool feeds the search (Boost) and so training; the test pool is only ever scored.
They must not share a problem, so overlap is an error rather than a warning.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from bdc.config import Params, SourceSettings
from bdc.jsonl import atomic_open
from bdc.problems.format import Problem, write_problems
from bdc.problems.sources import SourceError, load_source


def load_pool(sources: list[SourceSettings], default_min_tests: int) -> list[Problem]:
    problems: list[Problem] = []
    for src in sources:
        data = load_source(src.name, path=src.path, slice=src.slice, limit=src.limit,
                           min_tests=src.min_tests or default_min_tests)
        problems += data.problems
    return problems


def pool_metrics(problems: list[Problem]) -> dict:
    tests = [len(p.tests_for("all")) for p in problems]
    return {
        "problems": len(problems),
        "by_source": dict(Counter(p.source for p in problems)),
        "by_difficulty": dict(Counter(str(p.meta.get("difficulty", "n/a")) for p in problems)),
        "tests_per_problem": statistics.mean(tests) if tests else 0.0,
        "public_tests_per_problem": statistics.mean(len(p.tests.public) for p in problems)
        if problems else 0.0,
    }


def prepare(params: Params, out_dir: Path, metrics_path: Path) -> dict:
    min_tests = params.problems.split.min_tests
    explore = load_pool(params.problems.explore, min_tests)
    test = load_pool(params.problems.test, min_tests)
    overlap = {p.id for p in explore} & {p.id for p in test}
    if overlap:
        raise SourceError(f"problems.explore and problems.test share {len(overlap)} problems, "
                          f"e.g. {sorted(overlap)[0]!r}: make the pools disjoint")
    write_problems(out_dir / "explore.jsonl", explore)
    write_problems(out_dir / "test.jsonl", test)
    metrics = {"explore": pool_metrics(explore), "test": pool_metrics(test)}
    with atomic_open(metrics_path) as f:
        json.dump(metrics, f, indent=2)
    return metrics
