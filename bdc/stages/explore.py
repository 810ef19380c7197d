"""Stage ``explore`` (Boost): MC-Tree-of-Agents over every ``explore`` problem.

Many problems are searched at once, so the agents' LLM calls from all open trees are batched
(local backends) or in flight together (HTTP), and sandbox runs overlap with generation. Each
finished problem is scored on its hidden tests once and written atomically to its own file
(``trees/<id>.json``) keyed by a fingerprint of everything that determines it: a killed run
resumes with the problems still missing, and ends with the same outputs as a run that was
never interrupted. The training data (SFT records, preference pairs) and the metrics are
derived from those files at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bdc.boost.agents.base import Agent, Backend
from bdc.boost.tree_of_agents import Search, Tree
from bdc.config import AgentSettings, ExploreSettings, Params
from bdc.jsonl import atomic_open, write_jsonl
from bdc.problems.format import Problem, PublicView, read_problems
from bdc.problems.mini import render
from bdc.sandbox import Execution, ExecutionResult, Sandbox

log = logging.getLogger(__name__)
TREES = "trees"


# ----------------------------------------------------------------------------- agents

def make_backend(spec: AgentSettings) -> Backend:
    from bdc.boost.agents import backends

    if spec.backend == "hf":
        return backends.HFBackend(spec.model, spec.batch_size, spec.device, spec.dtype)
    if spec.backend == "vllm":
        return backends.VLLMBackend(spec.model, spec.batch_size, spec.dtype)
    if not spec.base_url:
        raise ValueError(f"explore.agents: backend http for {spec.model!r} needs base_url")
    return backends.OpenAIBackend(backends.HTTPSettings(
        base_url=spec.base_url, model=spec.model, api_key_env=spec.api_key_env,
        max_concurrency=spec.max_concurrency, retries=spec.retries, timeout_s=spec.timeout_s,
        price_input_per_mtok=spec.price_input_per_mtok,
        price_output_per_mtok=spec.price_output_per_mtok))


def make_agents(settings: ExploreSettings) -> list[Agent]:
    """One agent per configured name; agents on the same local model share its backend."""
    from bdc.boost.agents.llm import STYLES, LLMAgent, Sampling

    shared: dict[tuple, Backend] = {}
    agents = []
    for name, spec in settings.agents.items():
        key = (spec.backend, spec.model, spec.base_url, spec.device)
        if key not in shared:
            shared[key] = make_backend(spec)
        agents.append(LLMAgent(name, shared[key], STYLES[spec.style](),
                               Sampling(spec.temperature, spec.thought_tokens,
                                        spec.program_tokens)))
    on_cpu = sum(k[0] == "hf" and k[3] == "cpu" for k in shared)
    if on_cpu:
        share_cpu(on_cpu, settings.cpu_threads)
    return agents


def share_cpu(models: int, threads: int | None) -> None:
    """Local CPU models generate at once (one batch each) next to the sandbox; torch's
    default of one thread per core for each of them oversubscribes the cores, and its
    threads then wait on each other at every step. Measured on 2 cores, two mini agents:
    one thread each searched 7% faster than two each. Process-wide, as torch's setting is."""
    import torch

    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // models))


def model_identity(spec: AgentSettings) -> str:
    """A local model's training fingerprint when it has one (a retrained model is a new
    model), else its name."""
    record = Path(spec.model) / "training.json"
    try:
        return json.loads(record.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return spec.model


# ----------------------------------------------------------------------------- one problem

def fingerprint(problem: Problem, settings: ExploreSettings, seed: int) -> str:
    blob = json.dumps({
        "problem": problem.model_dump(mode="json"), "seed": seed,
        "search": settings.search.model_dump(),
        "agents": {n: {**a.model_dump(exclude={"batch_size", "max_concurrency", "device"}),
                       "identity": model_identity(a)} for n, a in settings.agents.items()},
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def tree_file(out_dir: Path, problem_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", problem_id)
    return out_dir / TREES / f"{safe}-{hashlib.sha1(problem_id.encode()).hexdigest()[:8]}.json"


def record_of(problem: Problem, tree: Tree, hidden: ExecutionResult | None,
              print_: str) -> dict:
    """What is kept of one problem: the full tree, the answer and its one hidden score."""
    best = tree.answer()
    answer = None
    if best is not None:
        node, run = best
        answer = {"node": node.id, "agent": run.agent, "thoughts": node.thoughts,
                  "program": run.code, "public_pass_rate": run.pass_rate,
                  "hidden": None if hidden is None else {
                      "status": hidden.status, "passed": hidden.passed, "total": hidden.total,
                      "pass_rate": hidden.pass_rate}}
    return {"problem_id": problem.id, "fingerprint": print_, "answer": answer,
            "solved_public": bool(answer and answer["public_pass_rate"] == 1.0),
            "solved_hidden": bool(answer and answer["hidden"]
                                  and answer["hidden"]["status"] == "passed"),
            "tree": tree.to_dict()}


async def _score_hidden(problem: Problem, tree: Tree, sandbox: Sandbox,
                        executor: ThreadPoolExecutor) -> ExecutionResult | None:
    """The answer on the hidden tests: the one time they are used."""
    best = tree.answer()
    if best is None or not best[1].code.strip():
        return None
    execution = Execution(program=best[1].code, kind=problem.kind,
                          entry_point=problem.entry_point, tests=problem.tests.hidden)
    return await asyncio.get_running_loop().run_in_executor(executor, sandbox.run, execution)


Method = Callable[[PublicView, ThreadPoolExecutor], Awaitable[Tree]]


async def search_all(problems: list[Problem], agents: list[Agent], settings: ExploreSettings,
                     sandbox: Sandbox, seed: int,
                     finish: Callable[[Problem, Tree, ExecutionResult | None], None],
                     method: Method | None = None) -> None:
    """Search ``problems`` with at most ``settings.concurrency`` trees open at once
    (``method``: another search over the same agents, e.g. a baseline)."""
    gate = asyncio.Semaphore(settings.concurrency)
    with ThreadPoolExecutor(max(2, sandbox.settings.workers * 2)) as executor:

        def tree_search(view: PublicView, pool: ThreadPoolExecutor) -> Awaitable[Tree]:
            return Search(view, agents, settings.search, sandbox, pool, seed).run()

        async def one(problem: Problem) -> None:
            async with gate:
                tree = await (method or tree_search)(problem.public_view(), executor)
                finish(problem, tree, await _score_hidden(problem, tree, sandbox, executor))

        await asyncio.gather(*(one(p) for p in problems))


async def closing(agents: list[Agent], work: Awaitable[None]) -> None:
    """Run ``work``, then release the agents' backends (connections, engines)."""
    try:
        await work
    finally:
        for backend in {id(a.backend): a.backend for a in agents
                        if hasattr(a, "backend")}.values():
            await backend.aclose()


# ----------------------------------------------------------------------------- outputs

def sft_records(problem: Problem, record: dict) -> list[dict]:
    """P2T and T2S records of a problem whose answer passes every hidden test."""
    if not record["solved_hidden"]:
        return []
    a = record["answer"]
    base = {"problem_id": problem.id, "source": problem.source, "prompt": problem.prompt,
            "thoughts": a["thoughts"], "program": a["program"], "agent": a["agent"]}
    out = []
    if a["thoughts"]:
        out.append({**base, "task": "p2t", "input": render(problem.prompt),
                    "output": "".join(f"{i}. {t}\n" for i, t in enumerate(a["thoughts"], 1))})
    out.append({**base, "task": "t2s", "input": render(problem.prompt, a["thoughts"]),
                "output": a["program"]})
    return out


def preference_pairs(problem: Problem, record: dict) -> list[dict]:
    """At each state: a child that beat its parent, against its worst simulated sibling."""
    nodes = record["tree"]["nodes"]
    pairs = []
    for parent in nodes:
        kids = [nodes[c] for c in parent["children"] if nodes[c]["programs"]]
        for chosen in kids:
            if chosen["value"] <= parent["value"]:
                continue
            worst = min(kids, key=lambda k: (k["value"], k["id"]))
            if worst["value"] < chosen["value"]:
                pairs.append({"problem_id": problem.id, "prompt": problem.prompt,
                              "thoughts": parent["thoughts"], "chosen": chosen["thoughts"][-1],
                              "rejected": worst["thoughts"][-1],
                              "chosen_value": chosen["value"],
                              "rejected_value": worst["value"]})
    return pairs


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
        "search_seconds": round(sum(t["seconds"] for t in trees), 1),
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


# ----------------------------------------------------------------------------- the stage

def explore(params: Params, problems: list[Problem], out_dir: Path, sandbox: Sandbox,
            agents: list[Agent] | None = None,
            on_progress: Callable[[int, int, int, float], None] | None = None,
            ) -> tuple[dict, list[dict]]:
    """Search every problem not already explored with these settings; writes the outputs,
    returns the metrics and the per-problem records (in problem order)."""
    settings = params.explore
    if settings.limit:
        problems = problems[:settings.limit]
    started = time.perf_counter()
    (out_dir / TREES).mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    prints = {p.id: fingerprint(p, settings, params.seed) for p in problems}
    for p in problems:
        try:
            old = json.loads(tree_file(out_dir, p.id).read_text())
        except (OSError, ValueError):
            continue
        if old.get("fingerprint") == prints[p.id]:
            records[p.id] = old
    resumed = len(records)
    todo = [p for p in problems if p.id not in records]
    log.info("explore: %d problems, %d already explored, %d to search", len(problems),
             resumed, len(todo))
    solved = sum(r["solved_hidden"] for r in records.values())

    def finish(problem: Problem, tree: Tree, hidden: ExecutionResult | None) -> None:
        nonlocal solved
        record = record_of(problem, tree, hidden, prints[problem.id])
        with atomic_open(tree_file(out_dir, problem.id)) as f:
            json.dump(record, f)
        records[problem.id] = record
        solved += record["solved_hidden"]
        if on_progress:
            on_progress(len(records), len(problems), solved, time.perf_counter() - started)

    if on_progress:
        on_progress(len(records), len(problems), solved, 0.0)
    if todo:
        agents = agents if agents is not None else make_agents(settings)
        asyncio.run(closing(agents, search_all(todo, agents, settings, sandbox, params.seed,
                                               finish)))
    keep = {tree_file(out_dir, p.id).name for p in problems}
    for stale in (out_dir / TREES).glob("*.json"):  # problems no longer in the pool
        if stale.name not in keep:
            stale.unlink()
    ordered = [(p, records[p.id]) for p in problems]
    write_jsonl(out_dir / "sft.jsonl", [r for p, rec in ordered for r in sft_records(p, rec)])
    write_jsonl(out_dir / "prefs.jsonl",
                [r for p, rec in ordered for r in preference_pairs(p, rec)])
    example = max((rec for _, rec in ordered), default=None,
                  key=lambda r: (r["solved_hidden"], len(r["tree"]["nodes"]) <= 40,
                                 len(r["tree"]["nodes"])))
    with atomic_open(out_dir / "example_tree.md") as f:
        f.write(render_tree(example) if example else "no problems\n")
    metrics = metrics_of([rec for _, rec in ordered], time.perf_counter() - started, resumed)
    metrics["sft_records"] = sum(len(sft_records(p, rec)) for p, rec in ordered)
    metrics["preference_pairs"] = sum(len(preference_pairs(p, rec)) for p, rec in ordered)
    return metrics, [rec for _, rec in ordered]


def per_family(problems: list[Problem], records: list[dict]) -> dict[str, float]:
    """Hidden solve rate per mini family (evaluation only: families are never searched on)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for p, record in zip(problems, records, strict=True):
        groups[p.meta.get("family", p.source)].append(record["solved_hidden"])
    return {f: sum(v) / len(v) for f, v in sorted(groups.items())}


def run(params: Params, problems_path: Path, out_dir: Path, metrics_path: Path,
        on_progress=None) -> dict:
    """The stage with its MLflow run: metrics, per-problem table, an example tree."""
    from bdc.tracking import stage_run

    problems = read_problems(problems_path)
    with stage_run("explore", {"explore": params.explore.model_dump(), "seed": params.seed,
                               "sandbox.timeout": params.sandbox.timeout},
                   params.profile) as tracked, Sandbox(params.sandbox) as sandbox:
        metrics, records = explore(params, problems, out_dir, sandbox, on_progress=on_progress)
        if params.explore.limit:
            problems = problems[:params.explore.limit]
        metrics["hidden_solve_rate_by_family"] = per_family(problems, records)
        with atomic_open(metrics_path) as f:
            json.dump(metrics, f, indent=2)
        tracked.metrics(metrics)
        rows = []
        for p, rec in zip(problems, records, strict=True):
            ans = rec["answer"] or {}
            rows.append({"problem_id": p.id, "nodes": len(rec["tree"]["nodes"]),
                         "programs": rec["tree"]["programs"], "tokens": rec["tree"]["tokens"],
                         "answer_agent": ans.get("agent"),
                         "public_pass_rate": ans.get("public_pass_rate"),
                         "solved_hidden": rec["solved_hidden"],
                         "stopped": rec["tree"]["stopped"]})
        tracked.table(rows, "problems.json")
        for name in ("example_tree.md", "sft.jsonl", "prefs.jsonl"):
            tracked.artifact(out_dir / name)
        tracked.artifact(metrics_path)
    return metrics
