"""What is kept of each explored problem, and how a run knows it may keep it.

A problem's record is its whole tree, its answer and the answer's one score on the hidden
tests, written to its own file under ``trees/`` and keyed by a fingerprint of everything that
determines the tree (``bdc.reuse``): the problem, the agents in order (and the identity of
their models), the search and the outcome-changing sandbox settings, the seed and the code
that makes trees. The metrics and the readable example tree are derived from the records.
"""

from __future__ import annotations

import hashlib
import re
import traceback
from collections import Counter, defaultdict
from pathlib import Path

from bdc import artifacts
from bdc.boost.tree_of_agents import Tree
from bdc.config import ExploreSettings, SandboxSettings
from bdc.problems.format import Problem
from bdc.reuse import code_version, digest, identity
from bdc.sandbox import ExecutionResult

# The code that makes a tree: a change to it (not to its comments or docstrings) is a new
# search. The builders of training data and metrics are not here: they re-derive every run.
TREE_CODE = ("boost/tree_of_agents.py", "boost/exploration.py", "boost/agents", "llm/base.py",
             "llm/backends.py", "llm/loading.py", "llm/prompts.py", "sandbox")
# Sandbox settings that cannot change a program's outcome (how many workers, which uids).
SANDBOX_NEUTRAL = {"workers", "uid_base", "strict"}


def tree_code_version() -> str:
    return code_version(TREE_CODE)


def fingerprint(problem: Problem, settings: ExploreSettings, sandbox: SandboxSettings,
                seed: int, code: str) -> str:
    """Everything that determines a problem's tree. Agents are a list: their order drives
    seeds and tie-breaks."""
    return digest({
        "problem": problem.model_dump(mode="json"), "seed": seed, "code": code,
        "search": settings.search.model_dump(),
        "sandbox": sandbox.model_dump(exclude=SANDBOX_NEUTRAL),
        "agents": [[n, {**a.model_dump(exclude={"batch_size", "max_concurrency", "device"}),
                        "identity": identity(a.model)}] for n, a in settings.agents.items()],
    })


def tree_file(out_dir: Path, problem_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", problem_id)
    tag = hashlib.sha1(problem_id.encode()).hexdigest()[:8]
    return out_dir / artifacts.TREES / f"{safe}-{tag}.json"


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


def per_family(problems: list[Problem], records: list[dict]) -> dict[str, float]:
    """Hidden solve rate per mini family (evaluation only: families are never searched on)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    solved = {r["problem_id"]: r["solved_hidden"] for r in records}
    for p in problems:
        if p.id in solved:
            groups[p.meta.get("family", p.source)].append(solved[p.id])
    return {f: sum(v) / len(v) for f, v in sorted(groups.items())}
