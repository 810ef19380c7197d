"""CodeContests (DeepMind) in its native row format.

Local ``path``: a JSONL or Parquet file of rows with ``name``, ``description``,
``public_tests`` / ``private_tests`` / ``generated_tests`` (each ``{"input": [...],
"output": [...]}``), ``difficulty`` (the dataset's integer enum), ``solutions``
(``{"language": [...], "solution": [...]}``). Without a path, the hub is used.
"""

from __future__ import annotations

from bdc.problems.format import Problem, Sample, StdioTest, Test, split_tests
from bdc.problems.sources import SourceData, SourceError, local_or_hub, parse_range

BANDS = {"easy": (0, 10), "hard": (11, 25)}  # the paper's difficulty bands
PYTHON3 = 3  # CodeContests language enum


def parse_band(spec: str | None) -> tuple[int, int] | None:
    return parse_range(spec, "CodeContests", BANDS)


def _tests(row: dict, key: str, where: str) -> list[Test]:
    block = row.get(key) or {"input": [], "output": []}
    ins, outs = list(block.get("input", [])), list(block.get("output", []))
    if len(ins) != len(outs):
        raise SourceError(f"{where}: {key} has {len(ins)} inputs but {len(outs)} outputs")
    return [StdioTest(input=i, output=o) for i, o in zip(ins, outs, strict=True)]


def load(min_tests: int = 2, limit: int | None = None, path: str | None = None,
         slice: str | None = None, split: str = "test") -> SourceData:
    band = parse_band(slice)
    rows = local_or_hub(path, "deepmind/code_contests", split)
    data = SourceData()
    for index, row in enumerate(rows):
        where = row.get("_where", f"code_contests row {index}")
        for key in ("name", "description"):
            if key not in row:
                raise SourceError(f"{where}: missing field {key!r}")
        difficulty = int(row.get("difficulty", 0))
        if band and not band[0] <= difficulty <= band[1]:
            continue
        all_tests = [t for key in ("public_tests", "private_tests", "generated_tests")
                     for t in _tests(row, key, where)]
        tests = split_tests(all_tests, min_tests)
        if tests is None:
            data.dropped += 1
            continue
        problem = Problem(
            id=f"codecontests/{split}/{row['name']}", source="codecontests",
            prompt=row["description"], kind="stdio", entry_point=None, tests=tests,
            meta={"difficulty": difficulty, "cf_rating": row.get("cf_rating"),
                  "band": next((b for b, (lo, hi) in BANDS.items() if lo <= difficulty <= hi),
                               None)})
        data.problems.append(problem)
        sols = row.get("solutions") or {}
        for lang, code in zip(sols.get("language", []), sols.get("solution", []), strict=False):
            if lang == PYTHON3:
                data.references.append(Sample(problem_id=problem.id, program=code))
                break
        if limit and len(data.problems) >= limit:
            break
    return data
