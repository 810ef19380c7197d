"""``bdc explore-compare``: the tree of agents against its baselines, logged to MLflow.

Not a pipeline stage (it searches the same problems many times over); an experiment a user
runs to check the Boost claim. The teams come from ``explore_compare`` in params.yaml: the
pipeline's own agents, and any others named there (mini profile: the tiny models they use
are trained first when missing, like the pretrain stage's, into ``explore_compare.models_dir``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from bdc.boost.compare import compare, markdown
from bdc.boost.exploration import closing, make_agents
from bdc.config import AgentSettings, ConfigError, Params
from bdc.jsonl import atomic_open
from bdc.problems.format import read_problems
from bdc.problems.mini import first_per_family
from bdc.sandbox import Sandbox


def team_settings(params: Params, teams: list[str] | None) -> dict[str, dict[str, AgentSettings]]:
    """Each chosen team's agents, by name (the pipeline's agents when no team is named)."""
    c = params.explore_compare
    known = {**params.explore.agents, **c.agents}
    defined = c.teams or {"explore": list(params.explore.agents)}
    chosen = teams or list(defined)
    unknown = [t for t in chosen if t not in defined]
    if unknown:
        raise ConfigError(f"explore_compare.teams: no team {unknown[0]!r}; defined: "
                          f"{', '.join(defined)}")
    out = {}
    for team in chosen:
        missing = [a for a in defined[team] if a not in known]
        if missing:
            raise ConfigError(f"explore_compare.teams.{team}: unknown agent {missing[0]!r} "
                              "(define it in explore.agents or explore_compare.agents)")
        out[team] = {a: known[a] for a in defined[team]}
    return out


def run(params: Params, problems_path: Path, out: Path, teams: list[str] | None = None,
        per_family: int | None = None, seeds: list[int] | None = None,
        problems_dir: Path = Path("data/problems"),
        on_result: Callable[[str, int, dict], None] | None = None) -> str:
    """Train what the teams' tiny models need, compare, write JSON + Markdown; the table."""
    from bdc.llm.mini_models import ensure_models
    from bdc.tracking import stage_run

    c = params.explore_compare
    seeds = seeds if seeds is not None else c.seeds
    per_family = per_family if per_family is not None else c.per_family
    chosen = team_settings(params, teams)
    needed = {Path(s.model).name: s for team in chosen.values() for s in team.values()
              if Path(s.model).parent == Path(c.models_dir) and Path(s.model).name in c.models}
    problems = first_per_family(read_problems(problems_path), per_family)
    with stage_run("explore-compare", {"explore": params.explore.model_dump(),
                                       "explore_compare": c.model_dump(), "seeds": seeds,
                                       "teams": list(chosen), "problems": len(problems)},
                   params.profile, doc=__doc__) as tracked, Sandbox(params.sandbox) as sandbox:
        if needed:
            ensure_models(params, {n: c.models[n] for n in needed}, Path(c.models_dir),
                          problems_dir)
        flat = {name: s for team in chosen.values() for name, s in team.items()}
        agents = {a.name: a for a in make_agents(flat, params.explore.cpu_threads, params.vllm)}
        teams_agents = {team: [agents[n] for n in members] for team, members in chosen.items()}
        temperatures = {name: s.temperature for name, s in flat.items()}
        summary = asyncio.run(closing(list(agents.values()), compare(
            teams_agents, problems, params.explore, seeds, sandbox, temperatures, on_result)))
        table = markdown(summary, params.explore.search.max_programs, len(problems), seeds)
        with atomic_open(out) as f:
            json.dump(summary, f, indent=2)
        with atomic_open(out.with_suffix(".md")) as f:
            f.write(table)
        tracked.metrics({name: {k: v for k, v in row.items()
                                if k not in ("runs", "team", "method", "deterministic")}
                         for name, row in summary.items()})
        tracked.artifact(out)
        tracked.artifact(out.with_suffix(".md"))
    return table
