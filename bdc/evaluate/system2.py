"""The System-2 side of the evaluate table, for reference and for the B claim: the tree of
agents, each agent's own tree and best-of-N pooled over the agents, at the explore budget of
executed programs, on the same test problems as the System-1 solvers (hidden tests score the
answer each picked by public pass rate). Kept apart from the System-1 solvers so that a change
to either regenerates only its own side (``bdc.evaluate.solvers.finished_dirs``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bdc.config import Params
from bdc.evaluate.runner import keep_json, restore_json
from bdc.problems.format import Problem


def system2_methods(names: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``(kind, agents)``: the tree of all agents; with several, each agent's own tree and
    best-of-N pooled over all of them (the strongest one-shot baseline at the same budget)."""
    if len(names) == 1:
        return [("tree", tuple(names))]
    return [("tree", tuple(names)), *[("tree", (n,)) for n in names],
            ("best_of_n", tuple(names))]


def system2(params: Params, test: list[Problem], seeds: list[int], sandbox,
            folder: Path | None = None) -> dict[str, list[dict]]:
    """The System-2 methods of :func:`system2_methods` on the test problems at the explore
    budget: each method's runs, one per seed (:func:`bdc.boost.compare.run_method`: totals
    and which problems it solved; :func:`bdc.evaluate.table.system2_rows` makes the table's
    rows). Each method's seed is kept in ``folder`` as it finishes and restored from there;
    the agents' models load only when something is left to search."""
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

    async def all_runs() -> dict[str, list[dict]]:
        return {f"System-2: {method_name(kind, members)}":
                [await one(kind, members, seed) for seed in seeds]
                for kind, members in system2_methods(list(params.explore.agents))}

    async def then_close() -> dict[str, list[dict]]:
        try:
            return await all_runs()
        finally:
            if agents:
                await closing(list(agents.values()), asyncio.sleep(0))

    return asyncio.run(then_close())
