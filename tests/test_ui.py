"""End to end through the UI path, as a user walks it, in a real headless browser (Debian's
Chromium driven by Playwright): `bdc ui` starts the Prefect server, MLflow server and a
worker per pool and deploys; the test opens the Prefect UI, presses the pipeline
deployment's Run button, waits in the UI for the run to complete, then opens the MLflow UI's
runs view and finds the stage run nested under the pipeline run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bdc.llm.vllm_server import free_port
from bdc.processes import is_loopback
from tests.conftest import processes_in

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
# headless as root; without the background-networking flags Chromium keeps dialling Google's
# hosts, which this machine's closed network refuses
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def run_pipeline_in_the_browser(prefect_url: str, mlflow_runs_url: str, project: Path,
                                shots: Path, pipeline_run_url=None) -> str:
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
            runs = pipeline_runs(prefect_url)
            assert len(runs) == 1, f"one press, one run: {runs}"
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
                f"the pipeline run did not complete in the UI: {pipeline_runs(prefect_url)}; "
                f"worker logs:\n{worker_logs(project)}")

            one_stage_run_in_the_browser(page, prefect_url, project, said, shots)

            page.goto(mlflow_runs_url)  # the runs view `bdc ui` links (not GenAI traces)
            expect(page.get_by_text("pipeline", exact=True).first).to_be_visible(
                timeout=60000)
            # the pipeline run's expander (MLflow 3.17's run-name cell) shows its children
            page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
            expect(page.get_by_text("prepare", exact=True).first).to_be_visible(
                timeout=30000)
            page.screenshot(path=str(shots / "mlflow-runs.png"))
            listed = page.inner_text("body")
            # the pipeline run's own page as the Prefect artifacts link it: the machine-
            # learning view (MLflow 3's default GenAI workflow showed it as an "Evaluation
            # run"), the verdict first in its description, the claims among its metrics
            page.goto(pipeline_run_url())
            expect(page.get_by_text("Best System-1 solver", exact=False).first).to_be_visible(
                timeout=60000)
            expect(page.get_by_text("claim.C_customized_vs_full", exact=True).first
                   ).to_be_visible(timeout=30000)
            page.screenshot(path=str(shots / "mlflow-pipeline-run.png"))
            shown = page.inner_text("body")
            assert "Evaluation runs" not in shown, shown[:2000]
            return listed + shown
        finally:
            browser.close()


def one_stage_run_in_the_browser(page, prefect_url: str, project: Path, said: list[str],
                                 shots: Path) -> None:
    """Issue 29: a Quick run of a one-stage deployment showed "0 Task runs" and "did not
    produce any artifacts" on the run page a person lands on (the stage ran in a subflow).
    The prepare deployment's Quick run, then that run's page: its task run and its artifact
    are there. prepare is a CPU stage again first (the pipeline's run dispatched it to the
    gpu pool, whose stage run is by design a run of its own on the other worker)."""
    import yaml
    from playwright.sync_api import expect

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["orchestration"].update(gpu_stages=[], gpu_pool=None)  # not a DVC dependency
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    page.goto(f"{prefect_url}/deployments")
    page.get_by_role("link", name="prepare", exact=True).first.click()
    quick_run(page, said)
    deadline = time.time() + 180
    while not [r for r in flow_runs(prefect_url, "prepare") if r[1] == "COMPLETED"]:
        runs = flow_runs(prefect_url, "prepare")
        assert time.time() < deadline and not any(
            state in ("FAILED", "CRASHED") for _, state in runs), \
            f"prepare's run: {runs}; worker logs:\n{worker_logs(project)}"
        time.sleep(2)
    ((run_id, _),) = flow_runs(prefect_url, "prepare")
    page.goto(f"{prefect_url}/runs/flow-run/{run_id}")
    try:
        expect(page.get_by_text("1 Task run", exact=False).first).to_be_visible(timeout=30000)
        page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
        expect(page.get_by_text("stage-prepare", exact=False).first).to_be_visible(
            timeout=30000)
    finally:
        page.screenshot(path=str(shots / "prefect-one-stage-run.png"))
    assert "did not produce any artifacts" not in page.inner_text("body")


def quick_run(page, said: list[str], presses: int = 3) -> None:
    """Run -> Quick run, pressed again while Prefect's server answers 503, its status for
    errors a client may retry (Prefect's own client retries them). Measured with both cores
    busy: 4 of 15 presses, each "database is locked" in the server's log (its SQLite store
    refuses a write that collides with the workers' polls and heartbeats); the UI then
    shows "Failed to schedule flow run" and has created nothing. Any other answer, or no
    request at all, fails."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for press in range(presses):
        page.get_by_role("button", name="Run", exact=True).click()
        try:
            with page.expect_response("**/create_flow_run", timeout=30000) as answer:
                page.get_by_text("Quick run", exact=True).click()
        except PlaywrightTimeout:
            pytest.fail("Quick run sent no create-flow-run request; the page said:\n"
                        + page.inner_text("body") + "\n" + "\n".join(said))
        response = answer.value
        if response.status != 503:
            assert response.ok, f"creating the flow run failed: {response.status} " \
                                f"{response.text()}"
            return
        said.append(f"press {press + 1}: 503 {response.text()}")
    pytest.fail(f"{presses} Run presses were all answered 503:\n" + "\n".join(said))


def pipeline_runs(prefect_url: str) -> list[tuple[str, str]]:
    """(name, state) of the pipeline deployment's flow runs."""
    return [(r["name"], r["state_type"]) for r in flow_run_rows(prefect_url, "pipeline")]


def flow_runs(prefect_url: str, deployment: str) -> list[tuple[str, str]]:
    """(id, state) of a deployment's flow runs."""
    return [(r["id"], r["state_type"]) for r in flow_run_rows(prefect_url, deployment)]


def flow_run_rows(prefect_url: str, deployment: str) -> list[dict]:
    """A deployment's flow runs, read as Prefect's client reads them: a 503 is asked
    again."""
    import httpx

    for _ in range(10):
        answer = httpx.post(f"{prefect_url}/api/flow_runs/filter", timeout=30, json={
            "deployments": {"name": {"any_": [deployment]}}})
        if answer.status_code != 503:
            break
        time.sleep(1)
    answer.raise_for_status()
    return answer.json()


def worker_logs(project: Path) -> str:
    return "\n".join(f"== {log}\n{log.read_text()[-1500:]}"
                     for log in sorted((project / "var/logs").glob("worker-*.log")))


def test_bdc_ui_fails_naming_a_worker_that_exits_or_never_reports(tmp_path):
    """`bdc ui` said the services ran as soon as the worker processes were launched: a run
    pressed in the UI then waited on a worker that was dead or still starting."""
    from bdc.processes import ServiceError
    from flows.services import wait_for_worker

    log = tmp_path / "worker-cpu.log"
    log.write_text("prefect: cannot reach the server\n")
    nowhere = f"http://127.0.0.1:{free_port()}"
    exited = subprocess.Popen(["false"])
    exited.wait()
    with pytest.raises(ServiceError, match="(?s)cpu pool's worker exited .*cannot reach"):
        wait_for_worker(nowhere, "cpu", "w", time.monotonic() + 30, exited, log)
    quiet = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(ServiceError, match="gpu pool's worker w did not report"):
            wait_for_worker(nowhere, "gpu", "w", time.monotonic() + 1, quiet, log)
    finally:
        quiet.kill()
        quiet.wait()


def test_only_this_start_s_worker_counts_as_online():
    """The server keeps a stopped worker ONLINE for ~90 s (until its foreman notices), and
    names are new each start: `bdc ui --stop && bdc ui` found the last session's worker
    online and went on while the new one was still starting. Against a server speaking
    Prefect's work-pool REST protocol: a worker counts by its name; a missing pool fails."""
    import http.server
    import threading

    from bdc.processes import ServiceError
    from flows.services import worker_online

    rows = [{"name": "ProcessWorker 1f2e", "status": "ONLINE"}]
    busy = False

    class Prefect(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            known = self.path == "/api/work_pools/cpu/workers/filter"
            status = 503 if busy else 200 if known else 404
            body = json.dumps(rows if status == 200 else {"detail": "busy or no such pool"})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Prefect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert not worker_online(url, "cpu", "bdc-cpu-new")  # the old one does not count
        rows.append({"name": "bdc-cpu-new", "status": "OFFLINE"})
        assert not worker_online(url, "cpu", "bdc-cpu-new")
        rows[-1]["status"] = "ONLINE"
        assert worker_online(url, "cpu", "bdc-cpu-new")
        busy = True  # Prefect's "retry": not yet, not an error
        assert not worker_online(url, "cpu", "bdc-cpu-new")
        busy = False
        with pytest.raises(ServiceError, match="answered 404"):
            worker_online(url, "gpu", "bdc-gpu-new")
    finally:
        server.shutdown()
        server.server_close()


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
    # an earlier run's table (the mini pipeline's, tests/fixtures/eval): the pipeline run
    # ends holding its verdict and headline metrics, which the browser checks
    shutil.copytree(Path(__file__).parent / "fixtures" / "eval", project / "data" / "eval",
                    dirs_exist_ok=True)
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
        prefect_url = f"http://127.0.0.1:{prefect_port}"
        # loopback only (issue 30): a team's servers, with their auth, are set up apart
        listening = [c.laddr for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN
                     and c.laddr.port in (prefect_port, mlflow_port)]
        assert {a.port for a in listening} == {prefect_port, mlflow_port}
        assert all(is_loopback(a.ip) for a in listening), listening
        said = started.stderr + started.stdout
        assert "PREFECT_API_URL" in said
        runs_url = next(w for w in said.split() if "workflowType=machine_learning" in w)
        from mlflow.tracking import MlflowClient

        from bdc.tracking import runs_view_url

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")

        def pipeline_run_url() -> str:  # the link run_summary_markdown gives
            (run,) = [r for r in client.search_runs(
                [client.get_experiment_by_name("bdc").experiment_id])
                if r.data.tags.get("bdc.stage") == "pipeline"]
            return runs_view_url(f"http://127.0.0.1:{mlflow_port}", run.info.experiment_id,
                                 run.info.run_id)

        text = run_pipeline_in_the_browser(prefect_url, runs_url, project, tmp_path,
                                           pipeline_run_url)
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

        experiment = client.get_experiment_by_name("bdc")
        runs = client.search_runs([experiment.experiment_id])
        by_stage = {r.data.tags["bdc.stage"]: r for r in runs}
        assert by_stage["prepare"].data.tags["mlflow.parentRunId"] == \
            by_stage["pipeline"].info.run_id
        assert by_stage["prepare"].data.metrics["explore.problems"] == 60
        # sized for the machine: MLflow's defaults ran 15 processes on 2 cores
        group = [pid for pid in os.listdir("/proc") if pid.isdigit() and
                 _group_of(int(pid)) == state["pids"]["mlflow-server"]]
        from flows.services import mlflow_workers

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
