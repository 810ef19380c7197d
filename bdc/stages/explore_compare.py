"""Does the tree of agents earn its keep? The same explore problems, the same budget of
executed programs, several seeds:

- the MC-Tree-of-Agents with all agents, and with each agent alone;
- best-of-N one-shot sampling from each agent, and from all agents sharing N.

Every method picks its answer by public pass rate and is scored once on the hidden tests.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bdc.boost.agents.base import Agent
from bdc.boost.tree_of_agents import Search, Tree, best_of_n
from bdc.config import Params
from bdc.jsonl import atomic_open
from bdc.problems.format import Problem, PublicView, read_problems
from bdc.problems.mini import first_per_family
from bdc.sandbox import ExecutionResult, Sandbox
from bdc.stages.explore import closing, make_agents, search_all


def methods(agents: list[Agent]) -> dict[str, tuple[str, list[Agent]]]:
    names = "+".join(a.name for a in agents)
    out = {f"tree({names})": ("tree", agents)}
    out.update({f"tree({a.name})": ("tree", [a]) for a in agents})
    out.update({f"best-of-N({a.name})": ("best_of_n", [a]) for a in agents})
    out[f"best-of-N({names})"] = ("best_of_n", agents)
    return out


def run_method(params: Params, problems: list[Problem], kind: str, agents: list[Agent],
               sandbox: Sandbox, seed: int) -> dict:
    search = params.explore.search
    results: list[tuple[Tree, ExecutionResult | None]] = []

    def method(view: PublicView, executor: ThreadPoolExecutor):
        if kind == "tree":
            return Search(view, agents, search, sandbox, executor, seed).run()
        return best_of_n(view, agents, search.max_programs, sandbox, executor, seed,
                         search.stop_when_solved, search.feedback_tests)

    def finish(problem: Problem, tree: Tree, hidden: ExecutionResult | None) -> None:
        results.append((tree, hidden))

    asyncio.run(search_all(problems, agents, params.explore, sandbox, seed, finish, method))
    n = len(problems)
    return {"hidden_solve_rate": sum(h is not None and h.status == "passed"
                                     for _, h in results) / n,
            "programs_per_problem": sum(t.programs for t, _ in results) / n,
            "tokens_per_problem": sum(t.tokens for t, _ in results) / n}


def compare(params: Params, problems: list[Problem], seeds: list[int], sandbox: Sandbox,
            on_result: Callable[[str, int, dict], None] | None = None) -> dict:
    agents = make_agents(params.explore)
    table: dict[str, list[dict]] = {}
    try:
        for name, (kind, members) in methods(agents).items():
            for seed in seeds:
                result = run_method(params, problems, kind, members, sandbox, seed)
                table.setdefault(name, []).append(result)
                if on_result:
                    on_result(name, seed, result)
    finally:
        asyncio.run(closing(agents, asyncio.sleep(0)))
    return {name: {key: {"mean": statistics.mean(r[key] for r in rows),
                         "std": statistics.pstdev(r[key] for r in rows) if len(rows) > 1
                         else 0.0} for key in rows[0]} | {"runs": rows}
            for name, rows in table.items()}


def markdown(summary: dict, budget: int, problems: int, seeds: list[int]) -> str:
    lines = [f"Explore problems: {problems}; budget: {budget} executed programs per problem; "
             f"seeds {seeds} (mean ± std)", "",
             "| method | hidden solve rate | programs / problem | tokens / problem |",
             "|---|---|---|---|"]
    for name, row in sorted(summary.items(), key=lambda kv: -kv[1]["hidden_solve_rate"]["mean"]):
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" if k == "hidden_solve_rate"
                 else f"{row[k]['mean']:.1f}" for k in
                 ("hidden_solve_rate", "programs_per_problem", "tokens_per_problem")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(params: Params, problems_path: Path, per_family: int | None, seeds: list[int],
        out: Path, on_result=None) -> str:
    """The comparison with its MLflow run; the markdown table."""
    from bdc.tracking import stage_run

    problems = first_per_family(read_problems(problems_path), per_family)
    with stage_run("explore-compare", {"explore": params.explore.model_dump(),
                                       "seeds": seeds, "problems": len(problems)},
                   params.profile) as tracked, Sandbox(params.sandbox) as sandbox:
        summary = compare(params, problems, seeds, sandbox, on_result)
        table = markdown(summary, params.explore.search.max_programs, len(problems), seeds)
        with atomic_open(out) as f:
            json.dump(summary, f, indent=2)
        with atomic_open(out.with_suffix(".md")) as f:
            f.write(table)
        tracked.metrics({name: {k: v for k, v in row.items() if k != "runs"}
                         for name, row in summary.items()})
        tracked.artifact(out)
        tracked.artifact(out.with_suffix(".md"))
    return table
