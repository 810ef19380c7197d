"""The search logic, exactly: scripted agents (no model) and the real sandbox."""

from __future__ import annotations

import asyncio
import math
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from bdc.boost.agents.scripted import ScriptedAgent
from bdc.boost.tree_of_agents import Node, Search, best_of_n, selection_score
from bdc.config import SandboxSettings, SearchSettings
from bdc.problems.format import CallTest, Problem
from bdc.problems.format import Tests as ProblemTests
from bdc.sandbox import Sandbox

# f(x) = x + 3; hidden tests use inputs the public ones do not.
PROBLEM = Problem(
    id="t/add3", source="test", prompt="Return x plus three.", kind="function", entry_point="f",
    tests=ProblemTests(public=[CallTest(input=[1], output=4), CallTest(input=[2], output=5)],
                hidden=[CallTest(input=[777], output=780), CallTest(input=[-9], output=-6)]),
    meta={"family": "arith", "reference": {"program": "def f(x):\n    return x + 3\n"}})


def add_k(thoughts: list[str] | None) -> str:
    """A program from the last 'add K' thought; no thought: a wrong program."""
    k = next((int(m) for t in reversed(thoughts or []) for m in re.findall(r"add (-?\d+)", t)),
             None)
    return "def f(x):\n    return x\n" if k is None else f"def f(x):\n    return x + {k}\n"


def agent(name: str, ks: list[int], priors: list[float] | None = None, **kw) -> ScriptedAgent:
    priors = priors or [1.0] * len(ks)
    return ScriptedAgent(
        name, lambda v, th, w, s: [(f"add {k}", p) for k, p in zip(ks, priors, strict=True)],
        lambda v, th, n, s: [add_k(th)] * n, **kw)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxSettings(workers=2)) as box:
        yield box


def search(agents, sandbox, **settings) -> tuple[Search, object]:
    s = SearchSettings(**{"width": 2, "trials": 1, "rollouts": 4, "max_depth": 2, **settings})
    with ThreadPoolExecutor(2) as pool:
        srch = Search(PROBLEM.public_view(), agents, s, sandbox, pool, seed=0)
        tree = asyncio.run(srch.run())
    return srch, tree


def test_selection_scores_follow_the_formulas():
    child = Node(id=1, parent=0, depth=1, thoughts=["t"], q=0.5, p=0.25, visits=1)
    s = SearchSettings(c_base=10, c=4)
    beta = math.log((9 + 10 + 1) / 10) + 4  # N = 9 parent visits
    assert selection_score(s, 9, child) == pytest.approx(
        0.5 + beta * 0.25 * math.sqrt(math.log(9)) / 2)
    assert selection_score(s.model_copy(update={"selection": "pucb"}), 9, child) == \
        pytest.approx(0.5 + 4 * 0.25 * math.sqrt(math.log(9)) / 2)
    uct = s.model_copy(update={"selection": "uct", "uct_c": 1.5})
    assert selection_score(uct, 9, child) == pytest.approx(0.5 + 1.5 * math.sqrt(math.log(9)))
    assert selection_score(uct, 9, Node(id=2, parent=0, depth=1, thoughts=["u"])) == math.inf
    # N = 1: no exploration bonus yet, Q decides
    assert selection_score(s, 1, child) == pytest.approx(0.5)


def test_every_agent_expands_and_simulates_and_the_answer_is_found(sandbox):
    a, b = agent("a", [5, 7]), agent("b", [3, 9])
    srch, tree = search([a, b], sandbox, boost=False, refine=False)
    root = tree.nodes[0]
    kids = [tree.nodes[c] for c in root.children]
    assert sorted(k.action for k in kids) == ["add 3", "add 5", "add 7", "add 9"]
    assert {k.agent for k in kids} == {"a", "b"}
    assert all(len(k.programs) == 2 and {r.agent for r in k.programs} == {"a", "b"}
               for k in kids)  # every agent writes for every node
    node, run = tree.answer()
    assert node.action == "add 3" and run.pass_rate == 1.0
    assert sum(k.p for k in kids) == pytest.approx(1.0)
    # values are public pass rates, backed up with discount gamma
    assert root.q == pytest.approx(0.9 * 1.0)
    assert root.visits == 1 + tree.rollouts


def test_identical_thoughts_become_one_child(sandbox):
    _, tree = search([agent("a", [3, 5], [0.2, 0.5]), agent("b", [3], [0.9])], sandbox,
                     rollouts=1, boost=False, refine=False)
    kids = [tree.nodes[c] for c in tree.nodes[0].children]
    assert sorted(k.action for k in kids) == ["add 3", "add 5"]
    assert next(k for k in kids if k.action == "add 3").prior == 0.9


def test_children_worse_than_their_parent_are_pruned_and_never_expanded(sandbox):
    # the root's program (no thought) passes nothing; "add 3" passes all; depth-2 thoughts
    # "add 100" pass nothing and are worse than their parent "add 3"
    a = ScriptedAgent("a", lambda v, th, w, s: [("add 100", 1.0)] if th else [("add 3", 1.0)],
                      lambda v, th, n, s: [add_k(th)] * n)
    _, tree = search([a], sandbox, rollouts=2, boost=False, refine=False)
    add3 = tree.nodes[tree.nodes[0].children[0]]
    assert add3.value == 1.0
    worse = [tree.nodes[c] for c in add3.children]
    assert worse and all(w.pruned and w.value == 0.0 and not w.expanded for w in worse)
    # with budget left and nothing else open, the best pruned node is reopened, not wasted
    _, tree = search([a], sandbox, rollouts=4, max_depth=3, boost=False, refine=False)
    reopened = [n for n in tree.nodes if any("reopened" in note for note in n.notes)]
    assert reopened and reopened[0].expanded and reopened[0].thoughts == ["add 3", "add 100"]


def test_refinement_sees_the_failing_public_tests_and_adds_a_sibling(sandbox):
    seen = []

    def rewrite(view, thoughts, feedback, seed):
        seen.append((list(thoughts), feedback))
        return ("add 3", 0.8)

    a = agent("a", [4], rewrite=rewrite)
    _, tree = search([a], sandbox, rollouts=1, boost=False, refine=True)
    (thoughts, feedback), = seen
    assert thoughts == ["add 4"]
    assert [(f.input, f.expected, f.actual) for f in feedback] == [([1], 4, 5), ([2], 5, 6)]
    kinds = {tree.nodes[c].action: tree.nodes[c].kind for c in tree.nodes[0].children}
    assert kinds == {"add 4": "propose", "add 3": "refine"}
    assert tree.answer()[0].kind == "refine"


def test_boosting_merges_the_other_agents_candidates(sandbox):
    got = []

    def merger(view, thoughts, candidates, seed):
        got.append(sorted(candidates))
        return ("add 3", 0.7)

    a = agent("a", [1], merger=merger)
    b = agent("b", [2])  # cannot merge
    _, tree = search([a, b], sandbox, rollouts=1, boost=True, refine=False)
    assert got == [["add 2"]]  # a sees b's candidates, not its own
    merged = [tree.nodes[c] for c in tree.nodes[0].children if tree.nodes[c].kind == "merge"]
    assert [(m.action, m.agent) for m in merged] == [("add 3", "a")]


def test_budgets_are_respected(sandbox):
    _, tree = search([agent("a", [5, 7]), agent("b", [6, 8])], sandbox, rollouts=10,
                     max_programs=5, boost=False, refine=False)
    assert tree.programs == 5 == sum(len(n.programs) for n in tree.nodes)
    assert tree.stopped == "max_programs"
    _, solved = search([agent("a", [3])], sandbox, rollouts=10, stop_when_solved=True)
    assert solved.stopped == "solved" and solved.rollouts == 1


def test_a_weak_agents_done_or_empty_reply_ends_the_node_with_a_note(sandbox):
    quiet = ScriptedAgent("q", lambda v, th, w, s: None, lambda v, th, n, s: [""] * n)
    _, tree = search([quiet], sandbox, rollouts=3)
    root = tree.nodes[0]
    assert root.terminal and "agents: chain complete" in root.notes
    assert root.programs[0].status == "error"
    # a complete chain is revisited: each rollout draws new programs for it
    assert tree.stopped == "rollouts" and len(root.programs) == 3
    assert root.visits == 1 + tree.rollouts
    assert quiet.calls[0][2] == (None, 1)  # at the root, the agent answers its own way


def test_the_search_never_sees_hidden_tests(sandbox):
    a, b = agent("a", [4, 3]), agent("b", [5])
    with ThreadPoolExecutor(1) as pool, pytest.raises(TypeError, match="PublicView"):
        Search(PROBLEM, [a], SearchSettings(), sandbox, pool, 0)
    srch, _ = search([a, b], sandbox)
    views = [view for ag in (a, b) for _, view, _ in ag.calls]
    assert views and all(not hasattr(v, "tests") and "reference" not in v.meta and
                         "family" not in v.meta for v in views)
    dumped = " ".join(v.model_dump_json() for v in views)
    assert "777" not in dumped and "780" not in dumped


def test_same_seed_same_tree(sandbox):
    def rnd_agent(name):
        import random

        return ScriptedAgent(name, lambda v, th, w, s: [
            (f"add {random.Random(s + i).randint(1, 6)}", random.Random(s - i).random())
            for i in range(w)], lambda v, th, n, s: [add_k(th)] * n)

    trees = [search([rnd_agent("a"), rnd_agent("b")], sandbox, rollouts=3)[1]
             for _ in range(2)]
    strip = [[(n.thoughts, n.prior, n.value, n.visits) for n in t.nodes] for t in trees]
    assert strip[0] == strip[1]


def test_best_of_n_shares_the_budget_and_stops_at_the_first_public_pass(sandbox):
    a = ScriptedAgent("a", lambda *x: None, lambda v, th, n, s: ["def f(x):\n    return x\n"] * n)
    b = ScriptedAgent("b", lambda *x: None,
                      lambda v, th, n, s: ["def f(x):\n    return x + 3\n"] * n)
    with ThreadPoolExecutor(2) as pool:
        tree = asyncio.run(best_of_n(PROBLEM.public_view(), [a, b], 6, sandbox, pool, 0))
        full = asyncio.run(best_of_n(PROBLEM.public_view(), [a], 4, sandbox, pool, 0))
    # one program per agent per round, round-robin; the first round already passes
    assert [c[2] for c in a.calls] == [(None, 1)] * 5 and b.calls[0][2] == (None, 1)
    assert tree.programs == 2 == len(tree.nodes[0].programs) and tree.stopped == "solved"
    assert full.programs == 4 and full.answer()[1].pass_rate == 0.0
    assert full.stopped == "max_programs"


# ----------------------------------------------------------------------------- a wrong search
# Each test below fails on a search with one specific defect (named in its docstring).

def passing_first_test_only() -> str:
    """Passes the first public test (1 -> 4), fails the second (2 -> 5)."""
    return "def f(x):\n    return x + 3 if x == 1 else x\n"


def test_selection_expands_the_best_child_not_the_worst(sandbox):
    """Defect: select takes the minimum score."""
    a = agent("a", [5, 3], [0.5, 0.5])
    _, tree = search([a], sandbox, rollouts=2, boost=False, refine=False, prune=False,
                     width=2)
    kids = {tree.nodes[c].action: tree.nodes[c] for c in tree.nodes[0].children}
    assert kids["add 3"].value == 1.0 and kids["add 5"].value == 0.0
    assert kids["add 3"].expanded and not kids["add 5"].expanded


def test_node_value_is_the_mean_of_its_programs(sandbox):
    """Defect: node value = the best program's pass rate instead of the mean."""
    right, wrong = "def f(x):\n    return x + 3\n", "def f(x):\n    return x\n"
    a = ScriptedAgent("a", lambda v, th, w, s: [("t", 1.0)],
                      lambda v, th, n, s: [right, wrong][:n])
    _, tree = search([a], sandbox, rollouts=1, trials=2, boost=False, refine=False)
    child = tree.nodes[tree.nodes[0].children[0]]
    assert sorted(r.pass_rate for r in child.programs) == [0.0, 1.0]
    assert child.value == pytest.approx(0.5)


def test_every_agent_writes_trials_programs_for_every_new_node(sandbox):
    """Defect: ``trials`` ignored."""
    a, b = agent("a", [5]), agent("b", [7])
    _, tree = search([a, b], sandbox, rollouts=1, trials=3, boost=False, refine=False,
                     max_programs=100)
    for who in (a, b):
        assert [n for kind, _, (_, n) in who.calls if kind == "write"] == [3, 3, 3]
    kids = [tree.nodes[c] for c in tree.nodes[0].children]
    assert all(len(k.programs) == 6 for k in kids)


def test_the_token_budget_ends_the_search(sandbox):
    """Defect: no token budget."""
    _, tree = search([agent("a", [5, 7], cost=10)], sandbox, rollouts=50, max_tokens=25,
                     boost=False, refine=False, max_depth=10, max_programs=1000)
    assert tree.stopped == "max_tokens" and 25 <= tree.tokens <= 25 + 3 * 10


def test_the_wall_time_budget_ends_the_search(sandbox):
    """Defect: no wall-time budget."""
    _, tree = search([agent("a", [5, 7])], sandbox, rollouts=50, wall_time_s=1e-6,
                     boost=False, refine=False, max_depth=10, max_programs=1000)
    assert tree.stopped == "wall_time" and tree.rollouts == 0


def test_no_chain_grows_past_max_depth(sandbox):
    """Defect: no depth budget."""
    a = ScriptedAgent("a", lambda v, th, w, s: [(f"step {len(th)}", 1.0)],
                      lambda v, th, n, s: ["def f(x):\n    return x\n"] * n)
    _, tree = search([a], sandbox, rollouts=10, max_depth=2, boost=False, refine=False,
                     prune=False, max_programs=1000)
    assert max(n.depth for n in tree.nodes) == 2
    assert any("max depth" in n.notes for n in tree.nodes)


def test_backup_discounts_with_the_configured_gamma(sandbox):
    """Defect: gamma hard-coded (0.9, the paper's)."""
    _, tree = search([agent("a", [3])], sandbox, rollouts=1, gamma=0.5, boost=False,
                     refine=False)
    assert tree.nodes[0].q == pytest.approx(0.5 * 1.0)


def test_feedback_holds_only_the_failing_public_tests(sandbox):
    """Defect: feedback includes passing tests."""
    seen = []
    a = ScriptedAgent("a", lambda v, th, w, s: [("half", 1.0)],
                      lambda v, th, n, s: [passing_first_test_only()] * n,
                      rewrite=lambda v, th, fb, s: seen.append(fb) or None)
    _, tree = search([a], sandbox, rollouts=1, boost=False, refine=True)
    (feedback,) = seen
    assert [(f.input, f.expected, f.actual) for f in feedback] == [([2], 5, 2)]


def test_refinement_rewrites_the_best_failing_child(sandbox):
    """Defect: refinement of the worst failing child."""
    seen = []

    def programs(view, thoughts, n, seed):
        return [passing_first_test_only() if thoughts == ["half"] else add_k(thoughts)] * n

    a = ScriptedAgent("a", lambda v, th, w, s: [("add 9", 0.5), ("half", 0.5)], programs,
                      rewrite=lambda v, th, fb, s: seen.append(list(th)) or None)
    _, tree = search([a], sandbox, rollouts=1, width=2, boost=False, refine=True)
    values = {tree.nodes[c].action: tree.nodes[c].value for c in tree.nodes[0].children}
    assert values == {"add 9": 0.0, "half": 0.5}
    assert seen == [["half"]]


SEEDS_SCRIPT = """
import asyncio, json
from concurrent.futures import ThreadPoolExecutor
from bdc.config import SandboxSettings, SearchSettings
from bdc.sandbox import Sandbox
from bdc.boost.tree_of_agents import Search
from tests.test_tree_of_agents import PROBLEM, agent
a = agent("a", [5, 7])
with Sandbox(SandboxSettings(workers=1)) as box, ThreadPoolExecutor(1) as pool:
    s = SearchSettings(width=2, trials=1, rollouts=2, max_depth=2)
    asyncio.run(Search(PROBLEM.public_view(), [a], s, box, pool, seed=3).run())
print(json.dumps(a.seeds))
"""


def test_agent_seeds_are_the_same_in_every_process():
    """Defect: seeds from Python's per-process ``hash()`` (a resumed run, in a new process,
    would draw other thoughts and programs)."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    runs = []
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", SEEDS_SCRIPT], cwd=ROOT, check=True,
                             capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1] and len(runs[0]) >= 4


def test_agents_take_only_their_roles(sandbox):
    planner = agent("planner", [3], roles=("propose", "refine"))
    coder = agent("coder", [9], roles=("write",))
    _, tree = search([planner, coder], sandbox, rollouts=2, boost=False, refine=True)
    assert {kind for kind, *_ in planner.calls} <= {"propose", "refine"}
    assert {kind for kind, *_ in coder.calls} == {"write"}
    assert all(r.agent == "coder" for n in tree.nodes for r in n.programs)
    assert tree.answer()[0].action == "add 3"  # the planner's thought, the coder's program


def test_widening_asks_for_new_thoughts_when_nothing_is_left_open(sandbox):
    import random

    a = ScriptedAgent("a", lambda v, th, w, s: [(f"add {random.Random(s).randint(4, 99)}", 1.0)]
                      if not th else None, lambda v, th, n, s: [add_k(th)] * n)
    _, narrow = search([a], sandbox, rollouts=4, width=1, boost=False, refine=False,
                       max_depth=1)
    _, wide = search([a], sandbox, rollouts=4, width=1, boost=False, refine=False,
                     max_depth=1, widen=True)
    assert len(narrow.nodes[0].children) == 1  # revisits of the one complete chain
    assert len(wide.nodes[0].children) > 1 and wide.nodes[0].widened >= 1
