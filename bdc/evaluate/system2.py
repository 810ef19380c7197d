"""The System-2 side of the evaluate table, for reference and for the B claim: the tree of
agents, each agent's own tree and best-of-N pooled over the agents, at the explore budget of
executed programs, on the same test problems as the System-1 solvers (hidden tests score the
answer each picked by public pass rate). Kept apart from the System-1 solvers so that a change
to either regenerates only its own side (``bdc.evaluate.solvers.finished_dirs``).
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

from bdc.config import Params
from bdc.evaluate.runner import keep_json, restore_json
from bdc.evaluate.table import interval, mean_std
from bdc.problems.format import Problem


def system2_methods(names: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``(kind, agents)``: the tree of all agents; with several, each agent's own tree and
    best-of-N pooled over all of them (the strongest one-shot baseline at the same budget)."""
    if len(names) == 1:
        return [("tree", tuple(names))]
    return [("tree", tuple(names)), *[("tree", (n,)) for n in names],
            ("best_of_n", tuple(names))]


def system2(params: Params, test: list[Problem], seeds: list[int], sandbox,
            folder: Path | None = None) -> tuple[dict, dict[str, dict[str, float]]]:
    """The System-2 methods of :func:`system2_methods` on the test problems at the explore
    budget (reference, and the B claim): their table rows, and per method each problem's
    strict accuracy (x100, mean over the seeds) for the intervals. Each method's seed is kept
    in ``folder`` as it finishes and restored from there; the agents' models load only when
    something is left to search."""
    from bdc.boost.compare import Method, method_name, run_method
    from bdc.boost.exploration import closing, make_agents

    agents: dict = {}

    async def one(kind: str, members: tuple[str, ...], seed: int) -> dict:
        stem = f"system2.{'+'.join(members)}" if kind == "tree" else \
            f"system2.{kind}.{'+'.join(members)}"
        path = folder / f"{stem}.seed{seed}.json" if folder else None
        if path and (kept := restore_json(path)) is not None:
            return kept
        if not agents:
            made = make_agents(params.explore.agents, params.explore.cpu_threads,
                               params.vllm)
            agents.update({a.name: a for a in made})
        run = await run_method(Method("system2", kind, tuple(agents[n] for n in members)),
                               test, params.explore, sandbox, seed)
        if path and not run["failed_problems"]:  # a failed problem is searched again
            keep_json(path, run)
        return run

    async def all_runs() -> tuple[dict, dict]:
        rows, problems = {}, {}
        for kind, members in system2_methods(list(params.explore.agents)):
            runs = [await one(kind, members, seed) for seed in seeds]
            name = f"System-2: {method_name(kind, members)}"
            solved = {pid: 100 * statistics.mean(r["solved"][pid] for r in runs)
                      for pid in set.intersection(*(set(r["solved"]) for r in runs))}
            problems[name] = solved
            rows[name] = {
                "pass_rate": mean_std([100 * r["hidden_pass_rate"] for r in runs]),
                "strict_accuracy": mean_std([100 * r["hidden_solve_rate"] for r in runs]),
                "strict_interval": interval(list(solved.values())),
                "problems": len(solved),
                "tokens": statistics.mean(r["tokens_per_problem"] for r in runs) * len(test),
                "programs_per_problem": statistics.mean(r["programs_per_problem"]
                                                        for r in runs),
                "seconds": None, "seeds": len(runs), "by_group": {}}
        return rows, problems

    async def then_close() -> tuple[dict, dict]:
        try:
            return await all_runs()
        finally:
            if agents:
                await closing(list(agents.values()), asyncio.sleep(0))

    return asyncio.run(then_close())
