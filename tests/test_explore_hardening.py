"""Stage explore, hardened: nothing a program or an agent does ends the stage, trees follow
their settings, and the training data comes from the tree. In-process with scripted agents
and the real sandbox (fast); `test_explore.py` runs the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bdc.boost.agents.scripted import ScriptedAgent
from bdc.boost.exploration import ExploreFailed, explore
from bdc.boost.records import tree_code_version, tree_file
from bdc.boost.training_data import preference_pairs, sft_records
from bdc.config import AgentSettings, ExploreSettings, Params, SandboxSettings, SearchSettings
from bdc.llm.base import BackendError
from bdc.problems import mini
from bdc.problems.format import CallTest, Problem
from bdc.problems.format import Tests as ProblemTests
from bdc.reuse import code_version
from bdc.sandbox import Sandbox

PROBLEMS = mini.load(slice="explore", limit=1).problems  # one per family


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxSettings(workers=2)) as box:
        yield box


def params(agents=("a",), **explore_kw) -> Params:
    search = SearchSettings(width=1, trials=1, rollouts=1, max_programs=3, max_depth=1)
    return Params(sandbox=SandboxSettings(workers=2), explore=ExploreSettings(
        agents={n: AgentSettings(backend="hf", model=f"model-{n}") for n in agents},
        search=search, concurrency=4, **explore_kw))


def returning(expr: str, name: str = "a") -> ScriptedAgent:
    program = f"def f(*args):\n    return {expr}\n"
    return ScriptedAgent(name, lambda v, th, w, s: [("plan", 0.5)],
                         lambda v, th, n, s: [program] * n)


def strict_json(path: Path) -> dict:
    def no_constants(name):
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=no_constants)


@pytest.mark.parametrize("expr", [
    "{1, 2}", "frozenset({3})", "b'ab\\xff'", "1+2j", "float('nan')", "{(1, 2): 3}",
    "[{1}, (b'x', 2j), {(1, 2): frozenset()}]", "'x' * 100000",
])
def test_whatever_a_failing_program_returns_its_tree_is_written_and_resumed(
        tmp_path, sandbox, expr):
    """Bug: `return {1, 2}` in a failing program crashed json.dump, and every resume."""
    out = tmp_path / "explore"
    metrics, _ = explore(params(), PROBLEMS, out, sandbox, agents=[returning(expr)])
    assert metrics["problems"] == len(PROBLEMS) and metrics["failed_problems"] == 0
    for p in PROBLEMS:
        record = strict_json(tree_file(out, p.id))
        feedback = record["tree"]["nodes"][0]["programs"][0]["feedback"]
        assert feedback and set(feedback[0]["actual"]) == {"repr"}  # shown, not lost
        assert len(feedback[0]["actual"]["repr"]) <= 2003
    again, _ = explore(params(), PROBLEMS, out, sandbox, agents=[returning(expr)])
    assert again["resumed_problems"] == len(PROBLEMS)


def flaky(fails_on: str) -> ScriptedAgent:
    def propose(view, thoughts, width, seed):
        if fails_on in view.id:
            raise BackendError("https://api.example/v1/chat/completions (m): HTTP 400: "
                             "This model's maximum context length is 8192 tokens")
        return [("plan", 0.5)]

    return ScriptedAgent("a", propose, lambda v, th, n, s: ["def f(*a):\n    return 0\n"] * n)


def test_one_problem_failing_never_loses_the_others_and_a_rerun_retries_it(tmp_path, sandbox):
    out = tmp_path / "explore"
    with pytest.raises(ExploreFailed, match="mini/explore/count/") as failed:
        explore(params(), PROBLEMS, out, sandbox, agents=[flaky("/count/")])
    assert "maximum context length" in str(failed.value) and "1 of 6" in str(failed.value)
    records = {p.id: strict_json(tree_file(out, p.id)) for p in PROBLEMS}
    bad = [pid for pid, r in records.items() if "error" in r]
    assert len(bad) == 1 and "/count/" in bad[0]
    assert "Traceback" in records[bad[0]]["error"]["traceback"]
    assert all("tree" in r for pid, r in records.items() if pid not in bad)
    assert not (out / "sft.jsonl").exists()  # nothing a later stage could take as complete
    # within the allowed share, the stage finishes and counts the failure
    metrics, _ = explore(params(max_failed_share=0.2), PROBLEMS, out, sandbox,
                         agents=[flaky("/count/")])
    assert metrics["failed_problems"] == 1 and metrics["failed"] == bad
    assert metrics["resumed_problems"] == 5 and metrics["problems"] == 5
    # once the agent works again, a re-run searches only the failed problem
    metrics, _ = explore(params(), PROBLEMS, out, sandbox, agents=[flaky("no such")])
    assert metrics["failed_problems"] == 0 and metrics["resumed_problems"] == 5


def test_trees_are_reused_only_under_the_settings_that_made_them(tmp_path, sandbox):
    """Bug: `dvc exp run -S sandbox.timeout=5` reused every tree: the sweep changed nothing."""
    out = tmp_path / "explore"
    agents = [returning("0", "a"), returning("1", "b")]
    first, _ = explore(params(("a", "b")), PROBLEMS, out, sandbox, agents=agents)
    assert first["resumed_problems"] == 0
    same, _ = explore(params(("a", "b")), PROBLEMS, out, sandbox, agents=agents)
    assert same["resumed_problems"] == len(PROBLEMS)
    slower = params(("a", "b")).model_copy(update={
        "sandbox": SandboxSettings(workers=2, timeout=5.0)})
    changed, _ = explore(slower, PROBLEMS, out, sandbox, agents=agents)
    assert changed["resumed_problems"] == 0
    # more workers change no outcome: trees are reused
    wider = slower.model_copy(update={"sandbox": SandboxSettings(workers=1, timeout=5.0)})
    assert explore(wider, PROBLEMS, out, sandbox, agents=agents)[0]["resumed_problems"] == 6
    swapped, _ = explore(params(("b", "a")), PROBLEMS, out, sandbox,
                         agents=list(reversed(agents)))
    assert swapped["resumed_problems"] == 0  # agent order drives seeds and tie-breaks
    reseeded = params(("b", "a")).model_copy(update={"seed": 1})
    assert explore(reseeded, PROBLEMS, out, sandbox,
                   agents=list(reversed(agents)))[0]["resumed_problems"] == 0


def test_a_tree_cut_short_by_its_wall_clock_is_searched_again(tmp_path, sandbox):
    """Bug: a tree stopped by `wall_time` counted as finished and was reused forever (a busy
    machine, or one huge prompt slowing every tree's batch, left trees of one rollout as the
    problems' results). A cut tree is kept (its outputs count this run) but never reused."""
    out = tmp_path / "explore"
    base = params()
    cut = base.model_copy(update={"explore": base.explore.model_copy(update={
        "search": base.explore.search.model_copy(update={"wall_time_s": 1e-6})})})
    first, _ = explore(cut, PROBLEMS, out, sandbox, agents=[returning("0")])
    assert first["stopped"] == {"wall_time": len(PROBLEMS)}
    assert first["cut_short"] == len(PROBLEMS) and first["problems"] == len(PROBLEMS)
    again, _ = explore(cut, PROBLEMS, out, sandbox, agents=[returning("0")])
    assert again["resumed_problems"] == 0  # searched again, not taken as done
    done, _ = explore(base, PROBLEMS, out, sandbox, agents=[returning("0")])
    assert done["cut_short"] == 0
    assert explore(base, PROBLEMS, out, sandbox,
                   agents=[returning("0")])[0]["resumed_problems"] == len(PROBLEMS)


def test_a_problem_whose_prompt_is_over_the_limit_fails_alone_before_any_search(
        tmp_path, sandbox):
    """Bug: one problem with a 57k-character prompt in a 7-problem pool slowed every
    tree's batched generation until all stopped on their wall clock. It is refused before
    any generation, named, and the others are searched as usual."""
    out = tmp_path / "explore"
    huge = PROBLEMS[0].model_copy(update={"prompt": "x" * 5000})
    problems = [huge, *PROBLEMS[1:]]
    with pytest.raises(ExploreFailed, match=rf"{huge.id}.*5000 characters.*max_prompt_chars"):
        explore(params(max_prompt_chars=4000), problems, out, sandbox, agents=[returning("0")])
    kept = {p.id: strict_json(tree_file(out, p.id)) for p in problems}
    assert "error" in kept[huge.id] and kept[huge.id]["error"]["type"] == "PromptTooLong"
    assert all("tree" in kept[p.id] for p in PROBLEMS[1:])
    metrics, _ = explore(params(max_prompt_chars=4000, max_failed_share=0.5), problems, out,
                         sandbox, agents=[returning("0")])
    assert metrics["failed"] == [huge.id] and metrics["resumed_problems"] == len(PROBLEMS) - 1


def test_limit_never_deletes_finished_trees_outside_the_selection(tmp_path, sandbox):
    out = tmp_path / "explore"
    explore(params(), PROBLEMS, out, sandbox, agents=[returning("0")])
    limited, _ = explore(params(limit=2), PROBLEMS, out, sandbox, agents=[returning("0")])
    assert limited["problems"] == 2 and limited["resumed_problems"] == 2
    assert len(list((out / "trees").glob("*.json"))) == len(PROBLEMS)  # paid for: kept
    again, _ = explore(params(), PROBLEMS, out, sandbox, agents=[returning("0")])
    assert again["resumed_problems"] == len(PROBLEMS)


def test_code_version_follows_the_code_not_its_docstrings(tmp_path):
    src = tmp_path / "search.py"
    src.write_text('"""The search."""\n\ndef f():\n    """Doc."""\n    return 1  # one\n')
    v1 = code_version(("search.py",), tmp_path)
    src.write_text('"""The search, reworded."""\n\ndef f():\n    """Other."""\n    return 1\n')
    assert code_version(("search.py",), tmp_path) == v1
    src.write_text('"""The search."""\n\ndef f():\n    """Doc."""\n    return 2\n')
    assert code_version(("search.py",), tmp_path) != v1
    assert tree_code_version() == tree_code_version()  # the real tree code hashes stably


# ----------------------------------------------------------------------------- training data

VIEW = Problem(id="t/1", source="t", prompt="Add three.", kind="function", entry_point="f",
               tests=ProblemTests(public=[CallTest(input=[1], output=4)],
                                  hidden=[CallTest(input=[9], output=12)]),
               meta={"family": "arith", "reference": {}, "difficulty": "easy"}).public_view()


def record(solved: bool, thoughts: list[str]) -> dict:
    hidden = {"status": "passed" if solved else "failed", "passed": int(solved), "total": 1,
              "pass_rate": float(solved)}
    return {"problem_id": "t/1", "solved_hidden": solved, "answer": {
        "node": 1, "agent": "coder", "thoughts": thoughts, "thought_agents": ["planner"],
        "program": "def f(x):\n    return x + 3\n", "public_pass_rate": 1.0,
        "hidden": hidden}, "tree": {"nodes": []}}


def test_sft_records_come_only_from_answers_that_pass_every_hidden_test():
    assert sft_records(VIEW, record(False, ["Add 3."])) == []
    p2t, t2s = sft_records(VIEW, record(True, ["Add 3."]))
    assert (p2t["task"], t2s["task"]) == ("p2t", "t2s")
    assert p2t["thoughts"] == t2s["thoughts"] == ["Add 3."]  # the chain the program came from
    assert t2s["program"] == "def f(x):\n    return x + 3\n" and t2s["hidden_pass_rate"] == 1.0
    assert "tests" not in t2s and "reference" not in json.dumps(t2s)
    (only,) = sft_records(VIEW, record(True, []))  # no chain: no P2T record
    assert only["task"] == "t2s"


def test_preference_pairs_pair_a_child_that_beat_its_parent_with_its_worst_sibling():
    def node(i, parent, value, thoughts, children=()):
        return {"id": i, "parent": parent, "value": value, "thoughts": thoughts,
                "children": list(children), "programs": [{}] if i else []}

    tree = {"nodes": [node(0, None, 0.2, [], [1, 2, 3]), node(1, 0, 0.5, ["a"]),
                      node(2, 0, 0.0, ["b"]), node(3, 0, 0.1, ["c"])]}
    pairs = preference_pairs(VIEW, {"tree": tree})
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "b")]


def test_public_view_meta_is_an_allow_list():
    problem = Problem(id="x", source="t", prompt="p", kind="function", entry_point="f",
                      tests=ProblemTests(), meta={"difficulty": 3, "family": "arith",
                                                  "reference": {"program": "..."},
                                                  "url": "https://...", "new_field": 1})
    assert problem.public_view().meta == {"difficulty": 3}


def test_comparison_reports_the_sample_std_and_says_when_seeds_cannot_differ():
    from bdc.boost.compare import markdown, summarise

    rows = [{"hidden_solve_rate": v, "programs_per_problem": 4.0, "tokens_per_problem": 10.0,
             "failed_problems": 0} for v in (0.5, 0.7, 0.6)]
    summary = summarise(rows)
    assert summary["hidden_solve_rate"]["mean"] == pytest.approx(0.6)
    assert summary["hidden_solve_rate"]["std"] == pytest.approx(0.1)  # n - 1, not n
    table = markdown({"t: tree(a)": {**summary, "team": "t", "method": "tree(a)",
                                     "deterministic": True}}, 16, 90, [0, 1, 2])
    assert "0.600 ± 0.100 (t=0)" in table and "measures nothing" in table


def test_a_method_s_run_says_which_problems_it_solved(sandbox):
    """B had no interval over problems: a System-2 method's run kept only totals. Its run now
    names each problem it solved on the hidden tests (the same problems the totals count),
    and the summary over seeds still averages only the figures."""
    import asyncio

    from bdc.boost.compare import Method, run_method, summarise

    problems = PROBLEMS[:3]
    right = {p.id: p.meta["reference"]["program"] for p in problems[:2]}  # not the third
    agent = ScriptedAgent("a", lambda v, th, w, s: [("plan", 0.5)],
                          lambda v, th, n, s: [right.get(v.id, "def f(*a):\n    return 0\n")] * n)
    settings = params().explore
    run = asyncio.run(run_method(Method("t", "best_of_n", (agent,)), problems, settings,
                                 sandbox, 0))
    assert run["solved"] == {problems[0].id: 1, problems[1].id: 1, problems[2].id: 0}
    assert run["hidden_solve_rate"] == pytest.approx(2 / 3)
    assert "solved" not in summarise([run, run]) and summarise([run])["runs"] == [run]


def test_methods_are_searched_at_once_under_one_limit_and_score_as_alone(sandbox):
    """The System-2 methods were searched one after another, each waiting for the last
    searches of the one before. They now run at once, never more than ``concurrency``
    searches open in all, and each method's run is what it is alone."""
    import asyncio
    import contextlib
    from dataclasses import dataclass

    from bdc.boost.compare import Method, run_method, run_methods

    in_flight: list[str] = []
    seen: list[tuple[str, ...]] = []
    together = {"now": True, "b_started": None}

    @dataclass
    class Slow(ScriptedAgent):
        async def write(self, view, thoughts, n, seed):
            in_flight.append(self.name)
            seen.append(tuple(in_flight))
            if together["now"] and together["b_started"] is None:
                together["b_started"] = asyncio.Event()
            if together["now"] and self.name == "b":
                together["b_started"].set()
            if together["now"] and self.name == "a" and view.id == problems[0].id:
                # a's first search is its long tail: it ends once b has begun (at once, b
                # waits for it; one after another, it times out and the problem fails)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(together["b_started"].wait(), 10)
            await asyncio.sleep(0.01)
            in_flight.remove(self.name)
            return await super().write(view, thoughts, n, seed)

    def slow(name: str) -> Slow:
        return Slow(name, lambda v, th, w, s: [("plan", 0.5)],
                    lambda v, th, n, s: ["def f(*a):\n    return 0\n"] * n)

    problems, settings = PROBLEMS[:4], params().explore.model_copy(update={"concurrency": 2})
    runs = [(Method("t", "best_of_n", (slow("a"),)), 0),
            (Method("t", "best_of_n", (slow("b"),)), 1)]
    both = asyncio.run(run_methods(runs, problems, settings, sandbox))
    assert max(map(len, seen)) == 2  # the limit holds over both methods
    assert any(set(s) == {"a", "b"} for s in seen)  # the two methods overlapped
    together["now"] = False
    alone = [asyncio.run(run_method(m, problems, settings, sandbox, seed)) for m, seed in runs]
    assert both == alone and both[0]["programs_per_problem"] == 3


def test_every_method_counts_what_it_executed_and_generated(sandbox):
    """Bug: best-of-N generated all N programs (and counted their tokens) but counted only
    those before the first public pass as its budget."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from bdc.boost.tree_of_agents import best_of_n

    wrong = ScriptedAgent("w", lambda *x: None,
                          lambda v, th, n, s: ["def f(x):\n    return x\n"] * n, cost=7)
    right = ScriptedAgent("r", lambda *x: None,
                          lambda v, th, n, s: ["def f(x):\n    return x + 3\n"] * n, cost=7)
    view = VIEW
    with ThreadPoolExecutor(2) as pool:
        tree = asyncio.run(best_of_n(view, [wrong, right], 8, sandbox, pool, 0))
    root = tree.nodes[0]
    assert tree.programs == len(root.programs) == 2  # one round: both agents, then solved
    assert tree.tokens == 2 * 7  # exactly the replies that produced those programs
