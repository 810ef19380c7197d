"""Problems already in the interchange format (hand-written or produced elsewhere)."""

from __future__ import annotations

from bdc.problems.format import read_problems
from bdc.problems.sources import SourceData, SourceError


def load(min_tests: int = 1, limit: int | None = None, path: str | None = None) -> SourceData:
    if not path:
        raise SourceError("source 'jsonl' needs a path")
    problems = read_problems(path)[:limit]
    kept = [p for p in problems if len(p.tests_for("all")) >= min_tests]
    return SourceData(problems=kept, dropped=len(problems) - len(kept))
