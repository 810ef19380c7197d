"""Does the tree of agents earn its keep? The same problems, the same budget of executed
programs, several seeds, for each team of agents:

- the MC-Tree-of-Agents with the whole team, and with each agent alone;
- best-of-N one-shot sampling from each agent, and from the whole team sharing N (pooled
  sampling: the strongest baseline when agents are good at different problems).

Every method picks its answer by public pass rate and is scored once on the hidden tests; all
of them count the same things (every program executed, every token of every request).
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bdc.boost.agents.base import Agent
from bdc.boost.exploration import search_all
from bdc.boost.tree_of_agents import Search, Tree, best_of_n
from bdc.config import ExploreSettings
from bdc.problems.format import Problem, PublicView
from bdc.sandbox import ExecutionResult, Sandbox


@dataclass(frozen=True)
class Method:
    team: str
    kind: str  # tree | best_of_n
    agents: tuple[Agent, ...]

    @property
    def name(self) -> str:
        return method_name(self.kind, [a.name for a in self.agents])


def method_name(kind: str, agents: Sequence[str]) -> str:
    """``tree(planner+coder)``, ``best-of-N(coder)``: a method's name from its agents'."""
    names = "+".join(agents)
    return f"tree({names})" if kind == "tree" else f"best-of-N({names})"


def methods(team: str, agents: list[Agent]) -> list[Method]:
    """The team's tree, each member's tree and best-of-N, and the team's pooled best-of-N."""
    out = [Method(team, "tree", tuple(agents))]
    if len(agents) > 1:
        out += [Method(team, "tree", (a,)) for a in agents]
    out += [Method(team, "best_of_n", (a,)) for a in agents]
    if len(agents) > 1:
        out.append(Method(team, "best_of_n", tuple(agents)))
    return out


async def run_method(method: Method, problems: list[Problem], settings: ExploreSettings,
                     sandbox: Sandbox, seed: int, gate: asyncio.Semaphore | None = None
                     ) -> dict:
    """One method on every problem with one seed: what it solved and what it spent, and
    which problems it solved (``solved``: problem id -> 1 or 0, for intervals over
    problems; a problem that could not be searched is absent). ``cut_short``: trees the
    wall clock stopped (``search.wall_time_s``), which a busy machine makes weaker."""
    search = settings.search
    agents = list(method.agents)
    results: list[tuple[str, Tree, ExecutionResult | None]] = []
    failed: list[str] = []

    def run_one(view: PublicView, executor: ThreadPoolExecutor):
        if method.kind == "tree":
            return Search(view, agents, search, sandbox, executor, seed).run()
        return best_of_n(view, agents, search.max_programs, sandbox, executor, seed,
                         search.stop_when_solved, search.feedback_tests)

    await search_all(problems, agents, settings, sandbox, seed,
                     lambda p, tree, hidden: results.append((p.id, tree, hidden)),
                     lambda p, exc: failed.append(p.id), run_one, gate)
    n = len(problems)
    solved = {pid: int(h is not None and h.status == "passed") for pid, _, h in results}
    return {"hidden_solve_rate": sum(solved.values()) / n,
            "hidden_pass_rate": sum(h.pass_rate for _, _, h in results if h is not None) / n,
            "programs_per_problem": sum(t.programs for _, t, _ in results) / n,
            "tokens_per_problem": sum(t.tokens for _, t, _ in results) / n,
            "failed_problems": len(failed),
            "cut_short": sum(t.stopped == "wall_time" for _, t, _ in results),
            "solved": dict(sorted(solved.items()))}


def summarise(rows: list[dict]) -> dict:
    """Mean and sample standard deviation (n - 1) of every figure over the seeds (the
    per-problem ``solved`` stays in ``runs``)."""
    return {key: {"mean": statistics.mean(r[key] for r in rows),
                  "std": statistics.stdev(r[key] for r in rows) if len(rows) > 1 else 0.0}
            for key in rows[0] if key != "solved"} | {"runs": rows}


async def run_methods(runs: Sequence[tuple[Method, int]], problems: list[Problem],
                      settings: ExploreSettings, sandbox: Sandbox,
                      on_result: Callable[[Method, int, dict], None] | None = None
                      ) -> list[dict]:
    """Every ``(method, seed)`` at once, sharing one limit of ``settings.concurrency`` open
    searches, their runs in ``runs`` order: no agent waits for another method's last few
    searches to finish. A run is the same either way (every sampled token depends on its own
    request's seed only). On 2 cores it gained no measurable time: the two served agents
    already share the CPU (the small profile's System-2 side, docs/profiles.md)."""
    gate = asyncio.Semaphore(settings.concurrency)

    async def one(method: Method, seed: int) -> dict:
        run = await run_method(method, problems, settings, sandbox, seed, gate)
        if on_result:
            on_result(method, seed, run)
        return run

    return list(await asyncio.gather(*(one(method, seed) for method, seed in runs)))


async def compare(teams: dict[str, list[Agent]], problems: list[Problem],
                  settings: ExploreSettings, seeds: list[int], sandbox: Sandbox,
                  temperatures: dict[str, float],
                  on_result: Callable[[str, int, dict], None] | None = None) -> dict:
    """Every method of every team, every seed, in one event loop (the agents' connections
    and batches belong to it), all searched at once (:func:`run_methods`)."""
    every = [method for team, agents in teams.items() for method in methods(team, agents)]
    runs = await run_methods(
        [(method, seed) for method in every for seed in seeds], problems, settings, sandbox,
        on_result and (lambda m, seed, run: on_result(f"{m.team}: {m.name}", seed, run)))
    return {f"{m.team}: {m.name}": {
        **summarise(runs[i * len(seeds):(i + 1) * len(seeds)]), "team": m.team,
        "method": m.name, "deterministic": all(temperatures[a.name] == 0 for a in m.agents)}
        for i, m in enumerate(every)}


def markdown(summary: dict, budget: int, problems: int, seeds: list[int]) -> str:
    lines = [f"Explore problems: {problems}; budget: {budget} executed programs per problem; "
             f"seeds {seeds}; mean ± sample std over the seeds", "",
             "| team | method | hidden solve rate | programs / problem | tokens / problem |",
             "|---|---|---|---|---|"]
    notes = []
    for row in sorted(summary.values(), key=lambda r: (r["team"],
                                                         -r["hidden_solve_rate"]["mean"])):
        rate = f"{row['hidden_solve_rate']['mean']:.3f} ± {row['hidden_solve_rate']['std']:.3f}"
        if row["deterministic"]:
            rate += " (t=0)"
            notes.append(row["method"])
        if row["failed_problems"]["mean"]:
            rate += f", {row['failed_problems']['mean']:.1f} failed"
        lines.append(f"| {row['team']} | {row['method']} | {rate} | "
                     f"{row['programs_per_problem']['mean']:.1f} | "
                     f"{row['tokens_per_problem']['mean']:.0f} |")
    if notes:
        lines += ["", "(t=0): every agent samples at temperature 0, so the seeds draw the same "
                  "programs and a std over seeds measures nothing."]
    return "\n".join(lines) + "\n"
