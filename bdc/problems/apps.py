"""APPS (Hendrycks et al.) in its native formats.

Local ``path`` is either the original release folder (``test/0000/question.txt``,
``input_output.json``, ``solutions.json``, ``metadata.json``, ``starter_code.py``) or a
JSON/JSONL file of Hugging Face rows (``problem_id``, ``question``, ``input_output`` as a JSON
string, ``solutions``, ``difficulty``, ``starter_code``). Without a path, the hub is used.
"""

from __future__ import annotations

import json
from pathlib import Path

from bdc.problems.format import CallTest, Problem, Sample, StdioTest, Test, split_tests
from bdc.problems.sources import SourceData, SourceError, hub_rows, parse_range, read_rows

# The paper's test slices (problem indices of the APPS test split).
SLICES = {"interview": (0, 99), "competition": (3000, 3099), "introductory": (4000, 4099)}


def parse_slice(spec: str | None) -> tuple[int, int] | None:
    return parse_range(spec, "APPS", SLICES)


def _text(value: object) -> str:
    """APPS stdio outputs are strings or lists of lines."""
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def parse_tests(io_spec: dict, where: str) -> tuple[str | None, list[Test]]:
    inputs, outputs = io_spec.get("inputs"), io_spec.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise SourceError(f"{where}: input_output needs equal-length 'inputs' and 'outputs' lists")
    fn_name = io_spec.get("fn_name")
    if fn_name:
        # APPS wraps each call-based expected value in a one-element list.
        tests: list[Test] = [
            CallTest(input=list(i) if isinstance(i, list) else [i],
                     output=o[0] if isinstance(o, list) and len(o) == 1 else o)
            for i, o in zip(inputs, outputs, strict=True)]
        return fn_name, tests
    return None, [StdioTest(input=_text(i), output=_text(o))
                  for i, o in zip(inputs, outputs, strict=True)]


def _rows_from_folder(root: Path) -> list[dict]:
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        def read(name: str, d: Path = d) -> str | None:
            f = d / name
            return f.read_text(encoding="utf-8") if f.exists() else None
        meta = json.loads(read("metadata.json") or "{}")
        rows.append({"problem_id": int(d.name), "question": read("question.txt") or "",
                     "input_output": read("input_output.json") or "",
                     "solutions": read("solutions.json") or "[]",
                     "difficulty": meta.get("difficulty", ""), "url": meta.get("url", ""),
                     "starter_code": read("starter_code.py") or "", "_where": str(d)})
    return rows


def load(min_tests: int = 2, limit: int | None = None, path: str | None = None,
         slice: str | None = "interview", split: str = "test") -> SourceData:
    bounds = parse_slice(slice)
    if path:
        p = Path(path)
        if not p.exists():
            raise SourceError(f"{p}: no such file or folder")
        rows = _rows_from_folder(p) if p.is_dir() else read_rows(p)
    else:
        rows = hub_rows("codeparrot/apps", split)
    data = SourceData()
    for index, row in enumerate(rows):
        pid = int(row.get("problem_id", index))
        if bounds and not bounds[0] <= pid <= bounds[1]:
            continue
        where = row.get("_where", f"apps row {index}")
        if not row.get("input_output"):
            data.dropped += 1
            continue
        try:
            io_spec = json.loads(row["input_output"])
        except json.JSONDecodeError as exc:
            raise SourceError(f"{where}: input_output is not JSON: {exc.msg}") from exc
        fn_name, all_tests = parse_tests(io_spec, where)
        tests = split_tests(all_tests, min_tests)
        if tests is None:
            data.dropped += 1
            continue
        starter = row.get("starter_code") or ""
        prompt = row["question"] + (f"\n\nStarter code:\n{starter}" if starter else "")
        problem = Problem(
            id=f"apps/{split}/{pid}", source="apps", prompt=prompt,
            kind="function" if fn_name else "stdio", entry_point=fn_name, tests=tests,
            meta={"difficulty": row.get("difficulty", ""), "problem_index": pid,
                  "url": row.get("url", "")})
        data.problems.append(problem)
        solutions = json.loads(row.get("solutions") or "[]")
        if solutions:
            data.references.append(Sample(problem_id=problem.id, program=solutions[0]))
        if limit and len(data.problems) >= limit:
            break
    return data
