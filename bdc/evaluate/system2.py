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
    rows). What is left is searched at once (:func:`bdc.boost.compare.run_methods`); each
    method's seed is kept in ``folder`` as it finishes and restored from there; the agents'
    models load only when something is left to search."""
    from bdc.boost.compare import Method, method_name, run_methods
    from bdc.boost.exploration import closing, make_agents

    plan = [(kind, members, seed) for kind, members in system2_methods(list(params.explore.agents))
            for seed in seeds]

    def path(kind: str, members: tuple[str, ...], seed: int) -> Path | None:
        stem = f"system2.{'+'.join(members)}" if kind == "tree" else \
            f"system2.{kind}.{'+'.join(members)}"
        return folder / f"{stem}.seed{seed}.json" if folder else None

    done = {key: kept for key in plan
            if (where := path(*key)) and (kept := restore_json(where)) is not None}
    left = [key for key in plan if key not in done]
    if left:
        agents = {a.name: a for a in make_agents(params.explore.agents,
                                                 params.explore.cpu_threads, params.vllm)}
        methods = {key: Method("system2", key[0], tuple(agents[n] for n in key[1]))
                   for key in left}

        def keep(method: Method, seed: int, run: dict) -> None:
            where = path(method.kind, tuple(a.name for a in method.agents), seed)
            if where and not run["failed_problems"]:  # a failed problem is searched again
                keep_json(where, run)

        runs = asyncio.run(closing(list(agents.values()), run_methods(
            [(methods[key], key[2]) for key in left], test, params.explore, sandbox, keep)))
        done |= dict(zip(left, runs, strict=True))
    out: dict[str, list[dict]] = {}
    for kind, members, seed in plan:
        out.setdefault(f"System-2: {method_name(kind, members)}", []).append(
            done[kind, members, seed])
    return out
