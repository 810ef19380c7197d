"""End to end through the UI path, as a user walks it, in a real headless browser (Debian's
Chromium driven by Playwright): `bdc ui` starts the Prefect server, MLflow server and a
worker per pool and deploys; the test opens the Prefect UI, presses the pipeline
deployment's Run button, waits in the UI for the run to complete, then opens the MLflow UI's
runs view and finds the stage run nested under the pipeline run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bdc.vllm_server import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
# headless as root; without the background-networking flags Chromium keeps dialling Google's
# hosts, which this machine's closed network refuses
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def run_pipeline_in_the_browser(prefect_url: str, mlflow_runs_url: str, shots: Path) -> str:
    """Deployments -> pipeline -> Run -> Quick run, wait for 'Completed' on the deployment's
    runs; then the MLflow runs view with the pipeline run expanded. The MLflow page text."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                             args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        said: list[str] = []  # what the page's requests and console said, for a failure
        page.on("console", lambda m: said.append(f"console {m.type}: {m.text}"))
        page.on("response", lambda r: said.append(f"{r.status} {r.request.method} {r.url}")
                if r.request.method != "GET" or r.status >= 400 else None)
        try:
            page.goto(f"{prefect_url}/deployments")
            page.get_by_role("link", name="pipeline", exact=True).first.click()
            quick_run(page, said)
            pressed = created_runs(prefect_url)
            assert pressed, ("the Run press created no flow run; the page said:\n"
                             + page.inner_text("body") + "\n" + "\n".join(said))
            done = page.get_by_text("Completed", exact=True)
            broken = page.get_by_text("Failed", exact=True).or_(
                page.get_by_text("Crashed", exact=True))
            deadline = time.time() + 400
            while time.time() < deadline:
                try:  # the runs list renders after the page loads: wait for it each time
                    expect(done.or_(broken).first).to_be_visible(timeout=15000)
                    break
                except AssertionError:
                    page.reload()
            page.screenshot(path=str(shots / "prefect-pipeline-run.png"))
            assert done.first.is_visible(), (
                f"the pipeline run did not complete in the UI; its flow runs: "
                f"{created_runs(prefect_url, wait=0)}; worker logs:\n{worker_logs()}")

            page.goto(mlflow_runs_url)  # the runs view `bdc ui` links (not GenAI traces)
            expect(page.get_by_text("pipeline", exact=True).first).to_be_visible(
                timeout=60000)
            # the pipeline run's expander (MLflow 3.17's run-name cell) shows its children
            page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
            expect(page.get_by_text("prepare", exact=True).first).to_be_visible(
                timeout=30000)
            page.screenshot(path=str(shots / "mlflow-runs.png"))
            return page.inner_text("body")
        finally:
            browser.close()



def quick_run(page, said: list[str], presses: int = 3) -> None:
    """Run -> Quick run, pressed again while Prefect's server answers 503. Its SQLite store
    refuses a write that collides with another ("database is locked": here the workers'
    heartbeats and polls, a run's label update) and answers 503, its status for "retry"
    (Prefect's own client retries it; the UI shows "Failed to schedule flow run" and
    creates nothing): measured with both cores busy, 4 of 15 presses. Any other answer,
    or no request at all, fails."""
    for press in range(presses):
        page.get_by_role("button", name="Run", exact=True).click()
        with page.expect_response(lambda r: r.url.endswith("/create_flow_run"),
                                  timeout=60000) as answer:
            page.get_by_text("Quick run", exact=True).click()
        response = answer.value
        if response.status != 503:
            assert response.ok, f"creating the flow run failed: {response.status} " \
                                f"{response.text()}"
            return
        said.append(f"press {press + 1}: 503 {response.text()}")
    pytest.fail(f"{presses} Run presses were all answered 503:\n" + "\n".join(said))


def created_runs(prefect_url: str, wait: float = 60) -> list[tuple[str, str]]:
    """(name, state) of the server's flow runs, once there is one (up to ``wait`` s)."""
    import httpx

    deadline = time.time() + wait
    while True:
        runs = httpx.post(f"{prefect_url}/api/flow_runs/filter", json={}, timeout=30).json()
        if runs or time.time() >= deadline:
            return [(r["name"], r["state_type"]) for r in runs]
        time.sleep(1)


def worker_logs() -> str:
    return "\n".join(f"== {log}\n{log.read_text()[-1500:]}"
                     for log in sorted(Path("var/logs").glob("worker-*.log")))


def test_bdc_ui_fails_naming_a_worker_that_exits_or_never_reports(tmp_path):
    """`bdc ui` said the services ran as soon as the worker processes were launched: a run
    pressed in the UI then waited on a worker that was dead or still starting."""
    from bdc.processes import ServiceError
    from bdc.services import wait_for_worker

    log = tmp_path / "worker-cpu.log"
    log.write_text("prefect: cannot reach the server\n")
    nowhere = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceError, match="(?s)cpu pool.s worker exited .*cannot reach"):
        wait_for_worker(nowhere, "cpu", 30, subprocess.Popen(["false"]), log)
    quiet = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(ServiceError, match="gpu pool's worker did not report"):
            wait_for_worker(nowhere, "gpu", 1, quiet, log)
    finally:
        quiet.kill()
        quiet.wait()


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


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@pytest.mark.timeout(600)
def test_ui_path_end_to_end(project, tmp_path):
    """Also checks dispatch: `prepare` is marked a GPU stage, so the pipeline (on the cpu
    worker) must hand it to the gpu pool's worker through the stage-gpu deployment. The
    project's pipeline deployment defaults to ``stages: [prepare]`` (a team sets such
    defaults in prefect.yaml the same way) so that Quick run stops after prepare: the whole
    pipeline through a flow is test_flows' test, and running it twice would cost CI four
    minutes."""
    import yaml

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["orchestration"].update(gpu_stages=["prepare"], gpu_pool="gpu")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    deployments = yaml.safe_load((project / "prefect.yaml").read_text())
    (pipeline,) = [d for d in deployments["deployments"] if d["name"] == "pipeline"]
    pipeline["parameters"] = {"stages": ["prepare"]}
    (project / "prefect.yaml").write_text(yaml.safe_dump(deployments, sort_keys=False))
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
        from bdc.services import online_workers

        prefect_url = f"http://127.0.0.1:{prefect_port}"
        assert all(online_workers(prefect_url, pool) for pool in ("cpu", "gpu"))
        said = started.stderr + started.stdout
        assert "PREFECT_API_URL" in said
        runs_url = next(w for w in said.split() if "workflowType=machine_learning" in w)
        text = run_pipeline_in_the_browser(prefect_url, runs_url, tmp_path)
        assert "pipeline" in text and "prepare" in text
        pools = subprocess.run([sys.executable, "-c", (
            "import asyncio\n"
            "from prefect.client.orchestration import get_client\n"
            "async def pools():\n"
            "    async with get_client() as c:\n"
            "        return sorted((r.work_pool_name or '-', r.state.type.value)\n"
            "                      for r in await c.read_flow_runs())\n"
            "print(asyncio.run(pools()))\n")],
            env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"},
            capture_output=True, text=True, timeout=120)
        assert "('gpu', 'COMPLETED')" in pools.stdout and "('cpu', 'COMPLETED')" in \
            pools.stdout, pools.stdout + pools.stderr
        assert (project / "data/problems/test.jsonl").exists()

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
        experiment = client.get_experiment_by_name("bdc")
        runs = client.search_runs([experiment.experiment_id])
        by_stage = {r.data.tags["bdc.stage"]: r for r in runs}
        assert by_stage["prepare"].data.tags["mlflow.parentRunId"] == \
            by_stage["pipeline"].info.run_id
        assert by_stage["prepare"].data.metrics["explore.problems"] == 60
        # sized for the machine: MLflow's defaults ran 15 processes on 2 cores
        group = [pid for pid in os.listdir("/proc") if pid.isdigit() and
                 _group_of(int(pid)) == state["pids"]["mlflow-server"]]
        from bdc.services import mlflow_workers

        assert len(group) <= mlflow_workers() + 3, group  # CLI, uvicorn, its workers
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
