"""The problem interchange format every stage reads (one JSON object per line).

```
{"id": "...", "source": "...", "prompt": "...", "kind": "function" | "stdio",
 "entry_point": "fn_name or null", "tests": {"public": [T, ...], "hidden": [T, ...]},
 "meta": {...}}
T = {"input": [args...], "output": value}    # function: entry_point(*input) == output
  | {"input": "stdin", "output": "stdout"}   # stdio, compared line by line
  | {"code": "assert ..."}                   # an assertion snippet run against the program
```
The search only ever receives a :class:`PublicView` of a problem: hidden tests are not in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.functional_validators import BeforeValidator

from bdc.jsonl import RecordError, read_jsonl, write_jsonl

# The only meta fields search and training may see (an allow-list: a field a new source adds
# stays private until someone decides it is fair to show). Reference solutions, URLs that lead
# to them and the mini family label (it only evaluates clustering) are never shown.
PUBLIC_META = ("task_id", "difficulty", "band", "split")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CallTest(_Record):
    input: list[Any]
    output: Any


class StdioTest(_Record):
    input: str
    output: str


class CodeTest(_Record):
    code: str = Field(min_length=1)


def _pick_test(value: Any) -> Any:
    """Choose the test shape by its keys and input type, so errors name the right fields."""
    if isinstance(value, CallTest | StdioTest | CodeTest):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"a test must be an object, got {type(value).__name__}")
    if "code" in value:
        return CodeTest.model_validate(value)
    if set(value) != {"input", "output"}:
        raise ValueError(f"a test has keys input+output or code, got {sorted(value)}")
    if isinstance(value["input"], str):
        return StdioTest.model_validate(value)
    if isinstance(value["input"], list):
        return CallTest.model_validate(value)
    raise ValueError("test input must be a list of arguments or a stdin string")


Test = Annotated[CallTest | StdioTest | CodeTest, BeforeValidator(_pick_test)]


class Tests(_Record):
    public: list[Test] = []
    hidden: list[Test] = []


class Problem(_Record):
    id: str = Field(min_length=1)
    source: str
    prompt: str
    kind: Literal["function", "stdio"]
    entry_point: str | None = None
    tests: Tests
    meta: dict[str, Any] = {}

    @model_validator(mode="after")
    def _consistent(self) -> Problem:
        everything = [*self.tests.public, *self.tests.hidden]
        if self.kind == "function":
            if not self.entry_point:
                raise ValueError("a function problem needs an entry_point")
            if any(isinstance(t, StdioTest) for t in everything):
                raise ValueError("a function problem cannot have stdin/stdout tests")
        elif any(not isinstance(t, StdioTest) for t in everything):
            raise ValueError("a stdio problem takes only stdin/stdout tests")
        return self

    def tests_for(self, split: Literal["public", "hidden", "all"]) -> list[Test]:
        if split == "all":
            return [*self.tests.public, *self.tests.hidden]
        return list(getattr(self.tests, split))

    def public_view(self) -> PublicView:
        return PublicView(id=self.id, source=self.source, prompt=self.prompt, kind=self.kind,
                          entry_point=self.entry_point, public_tests=self.tests.public,
                          meta={k: v for k, v in self.meta.items() if k in PUBLIC_META})


class PublicView(_Record):
    """What search and training may see of a problem: no hidden tests, by construction."""

    id: str
    source: str
    prompt: str
    kind: Literal["function", "stdio"]
    entry_point: str | None
    public_tests: list[Test]
    meta: dict[str, Any] = {}


def split_tests(tests: list[Test], min_tests: int) -> Tests | None:
    """Paper protocol: first half public, second half hidden; too few tests: dropped."""
    if len(tests) < min_tests or not tests:
        return None
    half = len(tests) // 2
    return Tests(public=tests[:half], hidden=tests[half:])


def read_problems(path: str | Path) -> list[Problem]:
    problems = list(read_jsonl(path, Problem.model_validate))
    seen: set[str] = set()
    for p in problems:
        if p.id in seen:
            raise RecordError(f"{path}: duplicate problem id {p.id!r}")
        seen.add(p.id)
    return problems


def write_problems(path: str | Path, problems: list[Problem]) -> int:
    return write_jsonl(path, problems)


class Sample(_Record):
    """A candidate solution: a whole ``program``, or a ``completion`` appended to the prompt."""

    problem_id: str
    program: str | None = None
    completion: str | None = None

    @model_validator(mode="after")
    def _one_body(self) -> Sample:
        if (self.program is None) == (self.completion is None):
            raise ValueError("a sample has exactly one of program or completion")
        return self

    def full_program(self, problem: Problem) -> str:
        if self.program is not None:
            return self.program
        return problem.prompt + self.completion
