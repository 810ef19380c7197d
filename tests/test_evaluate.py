"""Stage evaluate: the metrics against hand-computed values (pass rate, strict accuracy,
pass@k, the sample std), per group, and the claims; scoring overlaps generation."""

from __future__ import annotations

import statistics

import pytest

from bdc.evaluate.runner import Outcome
from bdc.evaluate.table import markdown, table


def outcome(solver, seed, pid, rate, tokens=10):
    return Outcome(solver, seed, pid, "p", [], tokens, 0.5, rate, rate == 1.0)


def test_metrics_are_the_hand_computed_values():
    # problems a (family x) and b (family y); three seeds
    rows = [outcome("s", 0, "a", 1.0), outcome("s", 0, "b", 0.5),
            outcome("s", 1, "a", 1.0), outcome("s", 1, "b", 1.0),
            outcome("s", 2, "a", 0.0), outcome("s", 2, "b", 0.25)]
    t = table(rows, {"a": "x", "b": "y"}, [0, 1, 2], [1, 3])["s"]
    rates = [100 * (1 + 0.5) / 2, 100 * (1 + 1) / 2, 100 * (0 + 0.25) / 2]  # per seed
    assert t["pass_rate"]["mean"] == pytest.approx(statistics.mean(rates))
    assert t["pass_rate"]["std"] == pytest.approx(statistics.stdev(rates))  # n - 1
    strict = [50.0, 100.0, 0.0]
    assert t["strict_accuracy"]["mean"] == pytest.approx(50.0)
    assert t["strict_accuracy"]["std"] == pytest.approx(statistics.stdev(strict))
    # pass@k over the 3 samples of each problem: a passed 2 of 3, b 1 of 3
    assert t["pass@1"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    assert t["pass@3"] == pytest.approx(100.0)
    assert t["by_group"]["x"]["strict_accuracy"]["mean"] == pytest.approx(100 * 2 / 3)
    assert t["by_group"]["y"]["pass_rate"]["mean"] == pytest.approx(100 * (0.5 + 1 + .25) / 3)
    assert t["tokens"] == 20 and t["seconds"] == pytest.approx(1.0)  # per seed
    assert t["strict_interval"] is None and t["problems"] == 2  # too few for an interval
    md = markdown({"s": t}, ["s"], [1, 3], "note")
    assert "| s | 62.5 ± 45.1 | 50.0 ± 50.0 |  | 50.0 | 100.0 |" in md
    assert md.endswith("note\n")


def test_one_seed_has_no_spread_and_pass_at_k_needs_k_samples():
    t = table([outcome("s", 0, "a", 1.0)], {}, [0], [1, 3])["s"]
    assert t["strict_accuracy"] == {"mean": 100.0, "std": 0.0}
    assert "pass@1" in t and "pass@3" not in t


def test_claims_compare_with_the_right_baselines():
    from bdc.evaluate.claims import claims

    def row(v):
        return {"strict_accuracy": {"mean": v, "std": 0.0}}

    result = {"full": row(10), "customized": row(15), "merge_uniform": row(5),
              "arrow": row(1), "oracle expert": row(12), "System-2: tree(a+b)": row(50),
              "System-2: tree(a)": row(0), "System-2: best-of-N(a+b)": row(45)}
    c = claims(result, ["cluster_0"], {})
    assert c["C_customized_vs_full"]["difference"] == 5
    assert c["C_customized_vs_uniform"]["difference"] == 10
    assert c["D_oracle_vs_full"]["difference"] == 2
    # B: against each agent's own tree and against best-of-N pooled over the agents
    assert c["B_tree_vs_baselines"] == [
        {"solver": "System-2: tree(a+b)", "baseline": "System-2: tree(a)", "difference": 50},
        {"solver": "System-2: tree(a+b)", "baseline": "System-2: best-of-N(a+b)",
         "difference": 5}]


def test_programs_are_scored_while_the_next_batch_generates():
    import threading

    from bdc.config import SandboxSettings
    from bdc.evaluate.runner import Runner
    from bdc.problems import mini
    from bdc.sandbox import Sandbox

    problems = mini.load(slice="test", limit=1).problems
    seen = []

    def run(on_batch):
        for start in range(0, len(problems), 2):
            chunk = problems[start:start + 2]
            on_batch(start, [([], p.meta["reference"]["program"]) for p in chunk], [5] * 2)
            seen.append(threading.active_count())

    with Sandbox(SandboxSettings(workers=1)) as sandbox:
        runner = Runner({p.id: p for p in problems}, sandbox)
        runner.generate([("ref", p.id, 0) for p in problems], run, chunk="ref")
        outcomes = runner.finish()
    assert [o.passed_all for o in outcomes] == [True] * len(problems)
    assert max(seen) > 1  # the scoring thread ran beside the generating one


def test_oracle_of_a_family_without_training_records_is_the_base():
    """A test family none of whose problems reached the training data has no home cluster;
    the evaluate stage crashed on it with KeyError (seen on the ci pools, where only arith
    is learnt). The oracle uses the base model there, and only there."""
    from bdc.evaluate.solvers import oracle_adapter
    from bdc.problems.format import Problem

    def problem(family):
        return Problem(id=f"t/{family}", source="mini", prompt="p", kind="stdio",
                       tests={"hidden": [{"input": "", "output": "1"}]},
                       meta={"family": family})

    home = {"arith": 2}
    assert oracle_adapter(problem("arith"), home) == "cluster_2"
    assert oracle_adapter(problem("string"), home) == "__base__"


def test_a_failed_evaluation_resumes_from_its_finished_chunks(tmp_path, caplog):
    """Issue 26.6: evaluate redid all its work after a kill or a failure. Finished chunks
    are kept and restored (their generation is not called again), the unfinished one is
    generated, and the result equals an uninterrupted run's; a damaged chunk is generated
    again with a warning naming its file."""
    import time

    from bdc.config import SandboxSettings
    from bdc.evaluate.runner import Runner
    from bdc.problems import mini
    from bdc.sandbox import Sandbox

    problems = mini.load(slice="test", limit=1).problems[:4]
    calls = []

    def program(p, solver):  # the second solver is wrong on purpose: scores must survive
        return p.meta["reference"]["program"] if solver == "a" else "def f(*a):\n    return 0\n"

    def run_of(solver, fail=False):
        def run(on_batch):
            calls.append(solver)
            on_batch(0, [([], program(p, solver)) for p in problems[:2]], [3, 3])
            if fail:
                raise RuntimeError("killed mid-chunk")
            on_batch(2, [([], program(p, solver)) for p in problems[2:]], [3, 3])
        return run

    def evaluation(folder, fail=False):
        with Sandbox(SandboxSettings(workers=1)) as sandbox:
            runner = Runner({p.id: p for p in problems}, sandbox, folder)
            for solver in ("a", "b"):
                runner.generate([(solver, p.id, 0) for p in problems],
                                run_of(solver, fail and solver == "b"), chunk=solver)
            return runner.finish(), runner.reused

    whole, _ = evaluation(None)
    # a model's loading is not generation time (it was split over the first chunk's rows)
    with Sandbox(SandboxSettings(workers=1)) as sandbox:
        runner = Runner({p.id: p for p in problems}, sandbox)
        runner.generate([("a", p.id, 0) for p in problems], run_of("a"), chunk="a",
                        load=lambda: time.sleep(1.0))
        assert sum(o.seconds for o in runner.finish()) < 0.5
    with pytest.raises(RuntimeError):
        evaluation(tmp_path, fail=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]  # b never looked done
    calls.clear()
    resumed, reused = evaluation(tmp_path)
    assert calls == ["b"] and reused == ["a"]
    key = [(o.solver, o.problem_id, o.program, o.pass_rate, o.passed_all) for o in whole]
    assert [(o.solver, o.problem_id, o.program, o.pass_rate, o.passed_all)
            for o in resumed] == key
    assert [o.passed_all for o in resumed] == [True] * 4 + [False] * 4

    (tmp_path / "a.jsonl").write_text('{"solver": "a", "se')  # a truncated chunk
    calls.clear()
    with caplog.at_level("WARNING"):
        again, reused = evaluation(tmp_path)
    assert calls == ["a"] and reused == ["b"] and "a.jsonl" in caplog.text
    assert [(o.solver, o.problem_id, o.program, o.pass_rate, o.passed_all)
            for o in again] == key


def test_a_claim_is_paired_over_problems_and_holds_only_where_its_interval_excludes_zero():
    """The ± over seeds said nothing about the test set's size, and two solvers' intervals
    compared side by side (unpaired) would call "undecided" what the same problems show
    plainly. Here a solver beats its baseline by exactly 10 points on every one of 30
    problems whose difficulty varies widely: paired, the interval is [10, 10]; a solver
    that wins on some problems and loses on as many is undecided."""
    from bdc.evaluate.claims import claims, lines
    from bdc.evaluate.table import interval, paired

    base = {f"p{i}": float(10 * (i % 10)) for i in range(30)}
    better = {p: v + 10 for p, v in base.items()}
    mixed = {p: v + (20 if i % 2 else -20) for i, (p, v) in enumerate(base.items())}
    assert paired(better, base) == {"difference": 10, "interval": [10, 10], "problems": 30,
                                    "verdict": "better"}
    low, high = interval(list(better.values()))  # unpaired, each row's own interval is wide
    assert high - low > 15
    assert paired(mixed, base)["verdict"] == "undecided"
    assert paired(base, better)["verdict"] == "worse"
    few = {p: better[p] for p in list(better)[:9]}  # 9 problems: no interval, no verdict
    assert paired(few, base) | {"difference": 0} == {"difference": 0, "interval": None,
                                                    "problems": 9, "verdict": "undecided"}

    def row(values):
        return {"strict_accuracy": {"mean": sum(values.values()) / len(values), "std": 0.0}}

    uniform = {p: v - mixed[p] + base[p] for p, v in better.items()}  # +-20 from better
    result = {"full": row(base), "customized": row(better), "merge_uniform": row(uniform)}
    problems = {"full": base, "customized": better, "merge_uniform": uniform}
    c = claims(result, ["cluster_0"], {}, problems)
    assert c["C_customized_vs_full"]["verdict"] == "better"
    assert c["C_customized_vs_uniform"]["verdict"] == "undecided"
    text = lines(c)
    assert "customized vs full: +10.0 points (95% CI +10.0 to +10.0 over 30 problems: " \
        "better)\n" in text and "- C: not measured\n" in text  # no Arrow row here


def test_the_bootstrap_interval_is_the_hand_computed_binomial_one():
    """A non-degenerate hand-computed case for the percentile bootstrap: 30 of 100 problems
    solved (100 points each, 0 otherwise). A resample's mean is then exactly Binomial(100,
    0.3) points, whose 2.5 % and 97.5 % quantiles are 21 and 39 (from its cumulative
    distribution: P(X <= 20) = 0.0165, P(X <= 21) = 0.0288, P(X <= 38) = 0.966, P(X <= 39) =
    0.979). One point of slack for the finite resamples; a 90 % level ([23, 38]) or the
    spread of the values instead of their mean's ([0, 100]) misses it."""
    from bdc.evaluate.table import interval

    low, high = interval([100.0] * 30 + [0.0] * 70)
    assert 20 <= low <= 22 and 38 <= high <= 40, (low, high)


def test_the_oracle_takes_its_home_expert_s_rows_and_the_base_s_where_there_is_none():
    """The oracle's rows are copies of its home expert's (the same sample, so the oracle and
    the experts are compared on the same programs); a family with no expert takes the base's
    rows; each seed keeps its own row."""
    from bdc.evaluate.solvers import oracle_rows
    from bdc.problems.format import Problem

    def problem(family):
        return Problem(id=f"t/{family}", source="mini", prompt="p", kind="stdio",
                       tests={"hidden": [{"input": "", "output": "1"}]},
                       meta={"family": family})

    test = [problem("arith"), problem("string")]
    rows = [Outcome(solver, seed, p.id, f"{solver}-{seed}-{p.id}", [], 5, 0.1, 1.0, True)
            for solver in ("base", "full", "cluster_0", "cluster_1") for seed in (0, 1)
            for p in test]
    oracle = oracle_rows(rows, test, {"arith": 1})
    assert [(o.solver, o.seed, o.program) for o in oracle] == [
        ("oracle expert", 0, "cluster_1-0-t/arith"), ("oracle expert", 0, "base-0-t/string"),
        ("oracle expert", 1, "cluster_1-1-t/arith"), ("oracle expert", 1, "base-1-t/string")]


def test_system2_rows_resample_problems_in_id_order():
    """Bug: a System-2 row's interval resampled its problems in a set's iteration order,
    which changes with Python's hash seed: the same results could give another interval in
    another process (the mini tree's 60 results: 35.0 to 58.3 in one set order, 33.3 to
    60.0 in id order, as its paired B claim had). Rows are made from the runs with problems
    in id order, whatever order the runs list them in."""
    from bdc.evaluate.table import interval, system2_rows

    ids = [f"p{i:02d}" for i in range(30)]
    solved = {pid: int(i % 3 == 0) for i, pid in enumerate(ids)}
    run = {"hidden_solve_rate": sum(solved.values()) / 30, "hidden_pass_rate": 0.5,
           "tokens_per_problem": 10.0, "programs_per_problem": 4.0, "failed_problems": 0}
    shuffled = dict(sorted(solved.items(), key=lambda kv: hash(kv[0]) % 97))
    rows, problems = system2_rows({"System-2: tree(a+b)": [{**run, "solved": shuffled},
                                                           {**run, "solved": solved}]}, 30)
    assert list(problems["System-2: tree(a+b)"]) == ids
    row = rows["System-2: tree(a+b)"]
    assert row["strict_interval"] == interval([100.0 * solved[p] for p in ids])
    assert row["problems"] == 30 and row["tokens"] == 300 and row["seeds"] == 2
