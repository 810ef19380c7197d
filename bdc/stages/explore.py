"""Stage ``explore`` (Boost): MC-Tree-of-Agents over every ``explore`` problem.

Each finished problem is scored on its hidden tests once and written atomically to its own
file (``trees/<id>.json``) keyed by a fingerprint of everything that determines it: the
problem, the agents in order, the search and the outcome-changing sandbox settings, the seed
and the code that makes trees. A killed run resumes with the problems still missing and ends
with the same outputs as a run that was never interrupted; a changed setting searches every
tree again. Trees of problems outside the current selection (``explore.limit``) are kept:
with API agents they are paid for. A problem whose search failed is recorded with its error,
counted, and searched again by the next run; the stage fails, naming them, only when their
share exceeds ``explore.max_failed_share``. The training data (SFT records, preference pairs)
and the metrics are derived from the tree files at the end.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import logging
import re
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from bdc.boost.agents.base import Agent
from bdc.boost.exploration import closing, make_agents, search_all
from bdc.boost.training_data import preference_pairs, sft_records
from bdc.boost.tree_of_agents import Tree
from bdc.config import AgentSettings, ExploreSettings, Params, SandboxSettings
from bdc.errors import BDCError
from bdc.jsonl import atomic_open, details_path, write_jsonl, write_metrics
from bdc.problems.format import Problem, read_problems
from bdc.sandbox import ExecutionResult, Sandbox

log = logging.getLogger(__name__)
TREES = "trees"
DERIVED = ("sft.jsonl", "prefs.jsonl", "example_tree.md")
# The code that makes a tree: a change to it (not to its comments or docstrings) is a new
# search. The builders of training data and metrics are not here: they re-derive every run.
TREE_CODE = ("boost/tree_of_agents.py", "boost/exploration.py", "boost/agents", "sandbox")
# Sandbox settings that cannot change a program's outcome (how many workers, which uids).
SANDBOX_NEUTRAL = {"workers", "uid_base", "strict"}

# the numbers `dvc metrics show` shows; all of them go to data/metrics/details/
HEADLINE = ("hidden_solve_rate", "sft_records", "wall_seconds")



class ExploreFailed(BDCError):
    """Too many problems could not be searched; the message names them."""


# ----------------------------------------------------------------------------- fingerprints

def model_identity(spec: AgentSettings) -> str:
    """A local model's training fingerprint when it has one (a retrained model is a new
    model), else its name."""
    record = Path(spec.model) / "training.json"
    try:
        return json.loads(record.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return spec.model


def code_version(root: Path | None = None, parts: tuple[str, ...] = TREE_CODE) -> str:
    """A hash of the tree-making code's syntax trees without docstrings (``parts`` under
    ``root``, the ``bdc`` package)."""
    root = root or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for part in parts:
        path = root / part
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            tree = ast.parse(file.read_text())
            for node in ast.walk(tree):
                body = getattr(node, "body", None)
                if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                        isinstance(getattr(body[0], "value", None), ast.Constant) and \
                        isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(ast.dump(tree).encode())
    return digest.hexdigest()[:16]


def fingerprint(problem: Problem, settings: ExploreSettings, sandbox: SandboxSettings,
                seed: int, code: str) -> str:
    """Everything that determines a problem's tree. Agents are a list: their order drives
    seeds and tie-breaks."""
    blob = json.dumps({
        "problem": problem.model_dump(mode="json"), "seed": seed, "code": code,
        "search": settings.search.model_dump(),
        "sandbox": sandbox.model_dump(exclude=SANDBOX_NEUTRAL),
        "agents": [[n, {**a.model_dump(exclude={"batch_size", "max_concurrency", "device"}),
                        "identity": model_identity(a)}] for n, a in settings.agents.items()],
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def tree_file(out_dir: Path, problem_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", problem_id)
    return out_dir / TREES / f"{safe}-{hashlib.sha1(problem_id.encode()).hexdigest()[:8]}.json"


# ----------------------------------------------------------------------------- records

def record_of(problem: Problem, tree: Tree, hidden: ExecutionResult | None,
              print_: str) -> dict:
    """What is kept of one problem: the full tree, the answer and its one hidden score."""
    best = tree.answer()
    answer = None
    if best is not None:
        node, run = best
        by = []  # who wrote each thought of the chain
        if node.thoughts:
            walk = node
            while walk.parent is not None:
                by.append(walk.agent)
                walk = tree.nodes[walk.parent]
            by.reverse()
        else:
            by = [run.agent] * len(run.thoughts)
        answer = {"node": node.id, "agent": run.agent, "thoughts": node.chain(run),
                  "thought_agents": by, "program": run.code,
                  "public_pass_rate": run.pass_rate,
                  "hidden": None if hidden is None else {
                      "status": hidden.status, "passed": hidden.passed, "total": hidden.total,
                      "pass_rate": hidden.pass_rate}}
    return {"problem_id": problem.id, "fingerprint": print_, "answer": answer,
            "solved_public": bool(answer and answer["public_pass_rate"] == 1.0),
            "solved_hidden": bool(answer and answer["hidden"]
                                  and answer["hidden"]["status"] == "passed"),
            "tree": tree.to_dict()}


def failure_of(problem: Problem, exc: BaseException, print_: str) -> dict:
    """A problem whose search failed: its error, with the traceback a bug report needs."""
    return {"problem_id": problem.id, "fingerprint": print_,
            "error": {"type": type(exc).__name__, "message": str(exc)[:2000],
                      "traceback": "".join(traceback.format_exception(exc))[-8000:]}}


def metrics_of(records: list[dict], seconds: float, resumed: int) -> dict:
    n = len(records)
    answers = [r["answer"] for r in records if r["answer"]]
    solved = [r for r in records if r["solved_hidden"]]
    agent_tokens: Counter = Counter()
    thought_share: Counter = Counter()
    stops: Counter = Counter()
    notes: Counter = Counter()
    for r in records:
        tree = r["tree"]
        agent_tokens.update(tree["agent_tokens"])
        stops[tree["stopped"]] += 1
        for node in tree["nodes"]:
            for note in node["notes"]:
                notes[note.split(":", 1)[-1].strip()] += 1
    for r in solved:
        nodes = r["tree"]["nodes"]
        node = nodes[r["answer"]["node"]]
        while node["parent"] is not None:
            thought_share[node["agent"]] += 1
            node = nodes[node["parent"]]
    answer_agents = Counter(r["answer"]["agent"] for r in solved)
    agents = sorted(set(agent_tokens) | set(answer_agents))
    total_thoughts = sum(thought_share.values())
    trees = [r["tree"] for r in records]
    return {
        "problems": n,
        "public_solve_rate": sum(r["solved_public"] for r in records) / n if n else 0.0,
        "hidden_solve_rate": len(solved) / n if n else 0.0,
        "hidden_pass_rate": sum(a["hidden"]["pass_rate"] for a in answers if a["hidden"])
        / n if n else 0.0,
        "sft_problems": len(solved),
        "nodes_per_problem": sum(len(t["nodes"]) for t in trees) / n if n else 0.0,
        "programs_per_problem": sum(t["programs"] for t in trees) / n if n else 0.0,
        "tokens": sum(t["tokens"] for t in trees),
        # trees are searched concurrently: their summed search time exceeds the wall time by
        # about the number of trees in flight
        "tree_seconds_summed": round(sum(t["seconds"] for t in trees), 1),
        "wall_seconds": round(seconds, 1),
        "resumed_problems": resumed,
        "stopped": dict(stops),
        "notes": dict(notes.most_common(10)),
        "agents": {a: {"tokens": agent_tokens[a],
                       "answer_share": answer_agents[a] / len(solved) if solved else 0.0,
                       "thought_share": thought_share[a] / total_thoughts
                       if total_thoughts else 0.0} for a in agents},
    }


def render_tree(record: dict, limit: int = 60) -> str:
    """A tree a person can read: one line per node, the answer's program at the end."""
    nodes = record["tree"]["nodes"]
    answer = record["answer"] or {}
    lines = [f"# {record['problem_id']}", "",
             f"answer from node {answer.get('node')} by {answer.get('agent')}: public "
             f"{answer.get('public_pass_rate')}, hidden {answer.get('hidden')}", "",
             "node | by | kind | prior p | value | Q | visits | thought", ""]

    def walk(i: int, indent: int) -> None:
        if len(lines) > limit + 5:
            return
        n = nodes[i]
        flags = " (pruned)" if n["pruned"] else ""
        lines.append(f"{'  ' * indent}- [{n['id']}] {n['agent'] or '-'} {n['kind']} "
                     f"p={n['p']:.2f} v={n['value']:.2f} Q={n['q']:.2f} N={n['visits']}"
                     f"{flags}: {n['thoughts'][-1] if n['thoughts'] else '(problem)'}")
        for c in n["children"]:
            walk(c, indent + 1)

    walk(0, 0)
    lines += ["", "```python", answer.get("program", "").rstrip(), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- searching

async def search_records(problems: list[Problem], agents: list[Agent], params: Params,
                         sandbox: Sandbox, prints: dict[str, str],
                         keep: Callable[[Problem, dict], None]) -> None:
    """Search ``problems``; each ends as a record (its tree and hidden score, or its error)
    handed to ``keep``."""
    await search_all(
        problems, agents, params.explore, sandbox, params.seed,
        lambda p, tree, hidden: keep(p, record_of(p, tree, hidden, prints[p.id])),
        lambda p, exc: keep(p, failure_of(p, exc, prints[p.id])))


def search_shard(problems: list[Problem], params: Params, prints: dict[str, str]
                 ) -> list[dict]:
    """A cluster task: ``problems`` searched together on a worker, with its own sandbox and
    agents; their records in problem order (the driver writes them). Trees are the same as
    in one process: every sampled token depends on its own request's seed only."""
    settings = params.explore
    got: dict[str, dict] = {}

    def collect(problem: Problem, record: dict) -> None:
        got[problem.id] = record

    with Sandbox(params.sandbox) as sandbox:
        agents = make_agents(settings.agents, settings.cpu_threads)
        asyncio.run(closing(agents, search_records(problems, agents, params, sandbox, prints,
                                                   collect)))
    return [got[p.id] for p in problems]


def search_on_cluster(params: Params, problems: list[Problem], prints: dict[str, str],
                      keep: Callable[[Problem, dict], None]) -> None:
    """``problems`` in shards of ``explore.cluster.shard_size`` on the Dask cluster; each
    record handed to ``keep`` here as its shard finishes. A shard whose task failed records
    its problems as failed (searched again by the next run); the others' work is kept."""
    from bdc.cluster import dask_client, map_shards, shards

    def shard_done(part: list[Problem], got: list[dict]) -> None:
        for problem, record in zip(part, got, strict=True):
            if record.get("problem_id") != problem.id:
                raise RuntimeError(f"cluster: a shard answered {record.get('problem_id')!r} "
                                   f"for {problem.id!r}")
            keep(problem, record)

    def shard_failed(part: list[Problem], exc: BaseException) -> None:
        for problem in part:
            keep(problem, failure_of(problem, exc, prints[problem.id]))

    cluster = params.explore.cluster
    with dask_client(cluster) as client:
        map_shards(client, search_shard, shards(problems, cluster.shard_size), params, prints,
                   done=shard_done, failed=shard_failed)


# ----------------------------------------------------------------------------- the stage

def explore(params: Params, problems: list[Problem], out_dir: Path, sandbox: Sandbox | None,
            agents: list[Agent] | None = None,
            on_progress: Callable[[int, int, int, float], None] | None = None,
            ) -> tuple[dict, list[dict]]:
    """Search every selected problem not already explored with these settings; writes the
    outputs, returns the metrics and the per-problem records (in problem order). With
    ``explore.cluster.address`` the problems are searched in shards on a Dask cluster (each
    worker with its own sandbox; ``sandbox`` unused), the trees written here as they come."""
    settings = params.explore
    if settings.limit:
        problems = problems[:settings.limit]
    started = time.perf_counter()
    (out_dir / TREES).mkdir(parents=True, exist_ok=True)
    for name in DERIVED:  # re-derived below; never left stale beside new trees
        (out_dir / name).unlink(missing_ok=True)
    code = code_version()
    prints = {p.id: fingerprint(p, settings, params.sandbox, params.seed, code)
              for p in problems}
    records: dict[str, dict] = {}
    for p in problems:
        try:
            old = json.loads(tree_file(out_dir, p.id).read_text())
        except (OSError, ValueError):
            continue
        if old.get("fingerprint") == prints[p.id] and "error" not in old:
            records[p.id] = old
    resumed = len(records)
    todo = [p for p in problems if p.id not in records]
    log.info("explore: %d problems, %d already explored, %d to search", len(problems),
             resumed, len(todo))
    solved = sum(r["solved_hidden"] for r in records.values())
    failed: dict[str, dict] = {}

    def keep(problem: Problem, record: dict) -> None:
        """One problem's record (its tree, or its error), written as soon as it exists."""
        nonlocal solved
        if "error" in record:
            failed[problem.id] = record
        else:
            records[problem.id] = record
            solved += record["solved_hidden"]
        with atomic_open(tree_file(out_dir, problem.id)) as f:
            json.dump(record, f, allow_nan=False)
        if on_progress:
            on_progress(len(records) + len(failed), len(problems), solved,
                        time.perf_counter() - started)

    if on_progress:
        on_progress(len(records), len(problems), solved, 0.0)
    if todo and settings.cluster.address:
        search_on_cluster(params, todo, prints, keep)
    elif todo:
        agents = agents if agents is not None else make_agents(settings.agents,
                                                               settings.cpu_threads)
        asyncio.run(closing(agents, search_records(todo, agents, params, sandbox, prints,
                                                   keep)))
    if len(failed) > settings.max_failed_share * len(problems):
        raise ExploreFailed(
            f"explore: {len(failed)} of {len(problems)} problems could not be searched "
            f"(more than explore.max_failed_share = {settings.max_failed_share}); their "
            f"errors are in {out_dir / TREES} and a re-run searches them again: "
            + "; ".join(f"{pid}: {f['error']['type']}: {f['error']['message'][:200]}"
                        for pid, f in list(failed.items())[:10])
            + (" ..." if len(failed) > 10 else ""))
    ordered = [(p, records[p.id]) for p in problems if p.id in records]
    views = {p.id: p.public_view() for p, _ in ordered}
    sft = [r for p, rec in ordered for r in sft_records(views[p.id], rec)]
    prefs = [r for p, rec in ordered for r in preference_pairs(views[p.id], rec)]
    write_jsonl(out_dir / "sft.jsonl", sft)
    write_jsonl(out_dir / "prefs.jsonl", prefs)
    example = max((rec for _, rec in ordered), default=None,
                  key=lambda r: (r["solved_hidden"], len(r["tree"]["nodes"]) <= 40,
                                 len(r["tree"]["nodes"])))
    with atomic_open(out_dir / "example_tree.md") as f:
        f.write(render_tree(example) if example else "no problems\n")
    metrics = metrics_of([rec for _, rec in ordered], time.perf_counter() - started, resumed)
    t2s = [r for r in sft if r["task"] == "t2s"]
    metrics.update({
        "sft_records": len(sft), "preference_pairs": len(prefs),
        "sft_p2t_records": len(sft) - len(t2s),
        "sft_chain_share": sum(bool(r["thoughts"]) for r in t2s) / len(t2s) if t2s else 0.0,
        "failed_problems": len(failed), "failed": sorted(failed)})
    return metrics, [rec for _, rec in ordered]


def per_family(problems: list[Problem], records: list[dict]) -> dict[str, float]:
    """Hidden solve rate per mini family (evaluation only: families are never searched on)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    solved = {r["problem_id"]: r["solved_hidden"] for r in records}
    for p in problems:
        if p.id in solved:
            groups[p.meta.get("family", p.source)].append(solved[p.id])
    return {f: sum(v) / len(v) for f, v in sorted(groups.items())}


def run(params: Params, problems_path: Path, out_dir: Path, metrics_path: Path,
        on_progress=None, plots_dir: Path | None = None) -> dict:
    """The stage with its MLflow run: metrics, per-problem table, an example tree, and a plot
    of the hidden solve rate per family (``plots_dir/explore.png``)."""
    from bdc.plots import bar_figure, save_png
    from bdc.tracking import stage_run

    problems = read_problems(problems_path)
    with stage_run("explore", {"explore": params.explore.model_dump(), "seed": params.seed,
                               "sandbox": params.sandbox.model_dump(exclude=SANDBOX_NEUTRAL)},
                   params.profile) as tracked, \
            (nullcontext() if params.explore.cluster.address else Sandbox(params.sandbox)) \
            as sandbox:
        tracked.dataset(problems_path, "explore problems", "search")
        metrics, records = explore(params, problems, out_dir, sandbox, on_progress=on_progress)
        metrics["hidden_solve_rate_by_family"] = per_family(problems, records)
        write_metrics(metrics_path, metrics, HEADLINE)
        # the notes' keys are free text (what agents got wrong): the metrics file has them
        tracked.metrics({k: v for k, v in metrics.items() if k != "notes"})
        if plots_dir is not None:
            rates = {"all": metrics["hidden_solve_rate"],
                     **metrics["hidden_solve_rate_by_family"]}
            tracked.artifact(save_png(bar_figure(
                rates, "hidden solve rate", f"explore: {metrics['problems']} problems, "
                f"{metrics['sft_records']} SFT records"), plots_dir / "explore.png"))
        rows = []
        for rec in records:
            ans = rec["answer"] or {}
            rows.append({"problem_id": rec["problem_id"], "nodes": len(rec["tree"]["nodes"]),
                         "programs": rec["tree"]["programs"], "tokens": rec["tree"]["tokens"],
                         "answer_agent": ans.get("agent"),
                         "chain_length": len(ans.get("thoughts") or []),
                         "public_pass_rate": ans.get("public_pass_rate"),
                         "solved_hidden": rec["solved_hidden"],
                         "stopped": rec["tree"]["stopped"]})
        tracked.table(rows, "problems.json")
        for name in DERIVED:
            tracked.artifact(out_dir / name)
        tracked.artifact(details_path(metrics_path))
    return metrics
