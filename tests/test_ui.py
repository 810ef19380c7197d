"""End to end through the UI path: `bdc ui` starts the Prefect server, MLflow server and a
worker per pool and deploys; a flow run of the pipeline deployment is created through the
Prefect API (what the UI's Run button does); the MLflow server then shows the runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_in(folder: Path) -> list[int]:
    """PIDs (other than this test's) whose working directory is inside ``folder``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.readlink(f"/proc/{entry}/cwd").startswith(str(folder)):
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_ui_path_end_to_end(project):
    """Also checks dispatch: `prepare` is marked a GPU stage, so the pipeline (on the cpu
    worker) must hand it to the gpu pool's worker through the stage-gpu deployment. The run
    takes the deployment's ``stages`` parameter (as the UI's custom run does) to stop after
    prepare: the whole pipeline through a flow is test_flows' test, and running it twice
    would cost CI four minutes."""
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["orchestration"].update(gpu_stages=["prepare"], gpu_pool="gpu")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prefect_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"  # workers poll every 10 s by default
    started = subprocess.run([str(BIN / "bdc"), "ui", "--prefect-port", str(prefect_port),
                              "--mlflow-port", str(mlflow_port)], cwd=project, env=env,
                             capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        state = json.loads((project / "var/services.json").read_text())
        assert set(state["pids"]) == {"prefect-server", "mlflow-server", "worker-cpu",
                                      "worker-gpu"}
        run = subprocess.run([sys.executable, "-c", (
            "import asyncio\n"
            "from prefect.client.orchestration import get_client\n"
            "from prefect.deployments import run_deployment\n"
            "fr = run_deployment('pipeline/pipeline', timeout=400, poll_interval=1,\n"
            "                    parameters={'stages': ['prepare']})\n"
            "async def pools():\n"
            "    async with get_client() as c:\n"
            "        return sorted((r.work_pool_name or '-', r.state.type.value)\n"
            "                      for r in await c.read_flow_runs())\n"
            "print(fr.state.type.value, asyncio.run(pools()))\n")],
            env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"},
            capture_output=True, text=True, timeout=450)
        assert run.stdout.startswith("COMPLETED"), run.stdout + run.stderr
        assert "('gpu', 'COMPLETED')" in run.stdout and "('cpu', 'COMPLETED')" in run.stdout
        assert (project / "data/problems/test.jsonl").exists()

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
        experiment = client.get_experiment_by_name("bdc")
        runs = client.search_runs([experiment.experiment_id])
        by_stage = {r.data.tags["bdc.stage"]: r for r in runs}
        assert by_stage["prepare"].data.tags["mlflow.parentRunId"] == \
            by_stage["pipeline"].info.run_id
        assert by_stage["prepare"].data.metrics["explore.problems"] == 60
    finally:
        stopped = subprocess.run([str(BIN / "bdc"), "ui", "--stop"], cwd=project, env=env,
                                 capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and "stopped" in stopped.stderr
    time.sleep(0.5)
    for pid in state["pids"].values():
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    strays = processes_in(project)
    info = {pid: (Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:200],
                  Path(f"/proc/{pid}/stat").read_text()[:120]) for pid in strays
            if Path(f"/proc/{pid}").exists()}
    assert strays == [], info
    assert not (project / "var/services.json").exists()
