"""Score samples on a problem's tests in the sandbox: pass rate, strict accuracy, pass@k."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

from pydantic import BaseModel

from bdc.problems.format import Problem, Sample
from bdc.sandbox import Execution, Sandbox


class SampleScore(BaseModel):
    problem_id: str
    sample_index: int  # position among this problem's samples, in input order
    status: Literal["passed", "failed", "error", "timeout"]
    passed: int
    total: int
    pass_rate: float
    test_status: list[str]
    detail: str = ""  # first failing test's message


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021), computed stably."""
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def score_samples(problems: dict[str, Problem], samples: Iterable[Sample], sandbox: Sandbox,
                  split: Literal["public", "hidden", "all"] = "hidden",
                  timeout: float | None = None,
                  on_result: Callable[[SampleScore], None] | None = None,
                  ) -> Iterator[SampleScore]:
    """Run every sample on its problem's tests of ``split``; results in input order."""
    counters: dict[str, int] = defaultdict(int)
    executions = []
    for sample in samples:
        problem = problems.get(sample.problem_id)
        if problem is None:
            raise KeyError(f"sample for unknown problem {sample.problem_id!r}")
        executions.append(Execution(
            program=sample.full_program(problem), kind=problem.kind,
            entry_point=problem.entry_point, tests=problem.tests_for(split),
            key=(sample.problem_id, counters[sample.problem_id])))
        counters[sample.problem_id] += 1
    for execution, result in sandbox.map(executions, timeout):
        pid, index = execution.key
        first_bad = next((o.detail for o in result.outcomes if o.status != "passed"), "")
        score = SampleScore(problem_id=pid, sample_index=index, status=result.status,
                            passed=result.passed, total=result.total,
                            pass_rate=result.pass_rate,
                            test_status=[o.status for o in result.outcomes], detail=first_bad)
        if on_result:
            on_result(score)
        yield score


def summarize(scores: list[SampleScore], ks: tuple[int, ...] = (1, 5, 10, 100)) -> dict:
    """Mean pass rate and strict accuracy over problems (first sample), pass@k over samples."""
    by_problem: dict[str, list[SampleScore]] = defaultdict(list)
    for s in scores:
        by_problem[s.problem_id].append(s)
    firsts = [min(v, key=lambda s: s.sample_index) for v in by_problem.values()]
    n_problems = len(by_problem)
    summary = {
        "problems": n_problems,
        "samples": len(scores),
        "pass_rate": sum(s.pass_rate for s in firsts) / n_problems if n_problems else 0.0,
        "strict_accuracy": sum(s.status == "passed" for s in firsts) / n_problems
        if n_problems else 0.0,
        "status_counts": {st: sum(s.status == st for s in scores)
                          for st in ("passed", "failed", "error", "timeout")},
    }
    n_min = min((len(v) for v in by_problem.values()), default=0)
    for k in ks:
        if n_min > 1 and k <= n_min:
            summary[f"pass@{k}"] = sum(
                pass_at_k(len(v), sum(s.status == "passed" for s in v), k)
                for v in by_problem.values()) / n_problems
    return summary


def solved(problems: list[Problem], programs: list[str], sandbox: Sandbox) -> list[bool]:
    """Does each program pass all of its problem's hidden tests?"""
    by_id = {p.id: p for p in problems}
    samples = [Sample(problem_id=p.id, program=code) for p, code in zip(problems, programs,
                                                                        strict=True)]
    return [s.status == "passed" for s in score_samples(by_id, samples, sandbox, "hidden")]
