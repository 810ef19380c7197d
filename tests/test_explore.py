"""Stage explore end to end: `bdc explore` in a project copy with local (tiny) agents, outputs,
MLflow, and resumption after a kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from bdc.problems.format import write_problems
from bdc.problems.mini import load


def setup_explore(root: Path, solver: Path) -> None:
    """12 problems (8 arith, which the solver model often solves, and 4 others) and two
    agents on that model: a planner-coder pair that takes every role."""
    problems = load(slice="explore", limit=8).problems
    chosen = [p for p in problems if p.meta["family"] == "arith"] + \
        [p for p in problems if p.meta["family"] == "filter"][:4]
    write_problems(root / "data/problems/explore.jsonl", chosen)
    shutil.copytree(solver, root / "data/models/solver")
    params = yaml.safe_load((root / "params.yaml").read_text())
    # one torch thread everywhere: Dask's workers compute on one (its nanny sets
    # OMP_NUM_THREADS=1), and the runs compared below must generate the same numbers
    params["explore"].update(limit=None, concurrency=3, cpu_threads=1)
    params["explore"]["search"].update(rollouts=2, max_programs=6, wall_time_s=600)
    agent = {"backend": "hf", "model": "data/models/solver", "style": "mini",
             "thought": "plan", "temperature": 0.8, "thought_tokens": 48,
             "program_tokens": 40, "batch_size": 32}
    params["explore"]["agents"] = {"agent_a": agent, "agent_b": {**agent, "temperature": 1.0}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def explore_cmd(out: str) -> list[str]:
    return ["bdc", "explore", "--out-dir", out, "--metrics", f"{out}/metrics.json"]


def comparable(folder: Path) -> dict:
    """Every output, with the timings (which differ between runs) left out."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".json" and path.parent.name == "trees":
            record = json.loads(path.read_text())
            record["tree"]["seconds"] = 0
            for node in record["tree"]["nodes"]:
                node["seconds"] = 0
            out[path.name] = record
        elif path.suffix in (".jsonl", ".md"):
            out[path.name] = path.read_text()
    return out


def test_explore_writes_trees_resumes_after_a_kill_and_runs_on_a_dask_cluster(
        project, solver_model):
    setup_explore(project, solver_model)
    full = subprocess.run(explore_cmd("full"), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stdout + full.stderr
    metrics = json.loads((project / "full/details/metrics.json").read_text())
    assert metrics["problems"] == 12 and metrics["resumed_problems"] == 0
    assert set(metrics["agents"]) == {"agent_a", "agent_b"}
    assert 0 < metrics["programs_per_problem"] <= 6 and metrics["tokens"] > 0
    trees = sorted((project / "full/trees").glob("*.json"))
    assert len(trees) == 12
    record = json.loads(trees[0].read_text())
    node = record["tree"]["nodes"][0]
    assert {"thoughts", "kind", "agent", "prior", "p", "value", "q", "visits", "programs",
            "tokens", "seconds"} <= set(node)
    assert record["answer"] is None or "hidden" in record["answer"]
    assert (project / "full/example_tree.md").read_text().startswith("# mini/explore/")
    sft = [json.loads(line) for line in (project / "full/sft.jsonl").read_text().splitlines()]
    assert metrics["sft_problems"] >= 2 and len(sft) >= 4  # real records to compare below
    assert metrics["sft_chain_share"] == 1.0 and all(r["thoughts"] for r in sft)

    # a run killed part-way resumes: finished problems are not searched again, and the
    # outputs equal the uninterrupted run's
    proc = subprocess.Popen(explore_cmd("part"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(list((project / "part/trees").glob("*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((project / "part/trees").glob("*.json")))
    assert 3 <= done_before < 12
    assert not (project / "part/sft.jsonl").exists()  # nothing that looks finished
    again = subprocess.run(explore_cmd("part"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = json.loads((project / "part/details/metrics.json").read_text())["resumed_problems"]
    assert resumed >= done_before
    assert comparable(project / "part") == comparable(project / "full")
    on_a_dask_cluster_equals_one_process_and_survives_a_lost_worker(project)


def on_a_dask_cluster_equals_one_process_and_survives_a_lost_worker(project: Path) -> None:
    """The same 12 problems in shards of 3 on a local Dask cluster of 2 workers (each with
    its own sandbox and agents), one worker killed once the first shard's trees are written:
    the scheduler runs its shard again, and trees, SFT records, preference pairs and metrics
    equal those of the one-process run (`full`)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["explore"]["cluster"] = {"address": "local", "workers": 2, "shard_size": 3}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.Popen(explore_cmd("cluster"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while len(list((project / "cluster/trees").glob("*.json"))) < 3 and \
            time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = worker_processes(proc.pid)
    assert len(workers) == 2 and proc.poll() is None
    assert len(list((project / "cluster/trees").glob("*.json"))) < 12
    workers[0].kill()  # its shard in flight is lost; the scheduler runs it again
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert comparable(project / "cluster") == comparable(project / "full")
    timing = {"wall_seconds", "tree_seconds_summed"}
    metrics = [{k: v for k, v in json.loads(
        (project / f"{d}/details/metrics.json").read_text()).items() if k not in timing}
        for d in ("full", "cluster")]
    assert metrics[0] == metrics[1] and metrics[0]["problems"] == 12


def worker_processes(pid: int) -> list:
    """A local Dask cluster's worker processes: the driver's spawned children."""
    import psutil

    return [c for c in psutil.Process(pid).children()
            if "spawn_main" in " ".join(c.cmdline())]


def test_explore_stage_is_logged_to_mlflow(project, solver_model):
    import mlflow

    from bdc import tracking

    setup_explore(project, solver_model)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["explore"]["limit"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run(explore_cmd("data/explore"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    experiment = tracking.setup(project)
    (run,) = [r for r in mlflow.search_runs([experiment], output_format="list")
              if r.data.tags["bdc.stage"] == "explore"]
    assert run.data.metrics["problems"] == 3 and "hidden_solve_rate" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"example_tree.md", "sft.jsonl", "prefs.jsonl", "problems.json"} <= artifacts


def test_local_cpu_models_share_the_cores(monkeypatch):
    """Torch threads follow the cores this process is given (OMP_NUM_THREADS, else its CPU
    affinity), not os.cpu_count(): the whole machine's count oversubscribed a container's
    share, and two test workers training at once ran ~7x slower."""
    import torch

    from bdc.boost.exploration import share_cpu
    from bdc.runtime import cpu_cores

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # a nested list: the outer level
        assert cpu_cores() == 4
        share_cpu(2, None)  # two models generating at once: half the cores each
        assert torch.get_num_threads() == 2
        share_cpu(2, 3)  # explore.cpu_threads wins
        assert torch.get_num_threads() == 3
        for unusable in ("0", "", "x"):
            monkeypatch.setenv("OMP_NUM_THREADS", unusable)
            assert cpu_cores() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


def test_explore_compare_with_http_agents_over_several_seeds(project, solver_model):
    """Bug: with HTTP agents the second method or seed failed (the client and its
    concurrency limit were bound to the first event loop)."""
    from tests.conftest import bdc_serve

    setup_explore(project, solver_model)
    with bdc_serve(project / "data/models/solver", "solver") as url:
        params = yaml.safe_load((project / "params.yaml").read_text())
        http = {"backend": "http", "model": "solver", "base_url": url, "api_key_env": None,
                "style": "mini", "thought": "plan", "temperature": 0.8,
                "thought_tokens": 48, "program_tokens": 40}
        params["explore_compare"] = {"seeds": [0, 1], "per_family": 1,
                                     "teams": {"served": ["h1", "h2"]},
                                     "agents": {"h1": http, "h2": {**http, "max_n_per_request": 1}}}
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        done = subprocess.run(["bdc", "explore-compare", "--out", "cmp.json"],
                              capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((project / "cmp.json").read_text())
    assert set(summary) == {f"served: {m}" for m in (
        "tree(h1+h2)", "tree(h1)", "tree(h2)", "best-of-N(h1)", "best-of-N(h2)",
        "best-of-N(h1+h2)")}
    for row in summary.values():
        assert len(row["runs"]) == 2 and row["failed_problems"]["mean"] == 0
        assert row["programs_per_problem"]["mean"] > 0
    assert "| served | tree(h1+h2) |" in done.stdout


def test_a_scheduler_without_workers_is_an_error_not_a_wait():
    """Pointed at a running Dask scheduler that had no workers, explore sent its shards and
    waited for a worker, silently, forever."""
    import logging

    from distributed import LocalCluster

    from bdc.boost.dask_shards import ClusterError, dask_client
    from bdc.config import ClusterSettings

    with LocalCluster(n_workers=0, dashboard_address=None,
                      silence_logs=logging.WARNING) as empty:
        settings = ClusterSettings(address=empty.scheduler_address, wait_for_workers_s=1)
        with pytest.raises(ClusterError, match="has no running workers after 1s"), \
                dask_client(settings):
            pass
