"""The local control room: Prefect server + UI, MLflow server, a worker per work pool.

``bdc ui`` (``python -m flows.services``) starts them on loopback, creates the ``cpu`` and
``gpu`` process work pools and deploys ``prefect.yaml``, so a user can trigger the pipeline
from the Prefect UI and compare the runs in MLflow; ``bdc ui --stop`` stops them. They are
driven through their own command lines as separate processes (each in its own session, so
stopping one stops its children), and their PIDs and logs live under ``var/``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bdc.errors import BDCError
from bdc.processes import ServiceError, group_alive, log_tail, stop_groups, wait_http
from bdc.runtime import configure_environment, state_dir
from bdc.tracking import artifact_root, tracking_uri

POOLS = ("cpu", "gpu")


@dataclass
class Services:
    prefect_url: str
    mlflow_url: str
    pids: dict[str, int] = field(default_factory=dict)


def _state_file(root: Path) -> Path:
    return state_dir(root) / "services.json"


def _bin(name: str) -> str:
    """A tool from this environment (the venv's bin), not whatever is first on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def mlflow_server(root: Path, port: int, workers: int) -> list[str]:
    """The MLflow server's command line on ``root``'s store (its runs and artifacts)."""
    return [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", tracking_uri(root), "--default-artifact-root",
            artifact_root(root), "--workers", str(workers)]


def _environment(root: Path, services: Services) -> dict[str, str]:
    configure_environment(root)
    return {**os.environ, "PREFECT_API_URL": f"{services.prefect_url}/api",
            "BDC_MLFLOW_UI": services.mlflow_url, "BDC_PROJECT": str(root),
            "MLFLOW_TRACKING_URI": tracking_uri(root),
            # the job queue runs GenAI scorers (huey workers); nothing here uses it
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def mlflow_workers() -> int:
    """Web workers for this machine: MLflow's default of 4 (plus its job queue) ran 15
    processes on 2 cores; one per two cores, at most 4, is plenty for a team's browsing."""
    return max(1, min(4, len(os.sched_getaffinity(0)) // 2))


def start(root: Path, prefect_port: int = 4200, mlflow_port: int = 5000,
          timeout: float = 120.0, progress: Callable[[str], None] = lambda _: None
          ) -> Services:
    """Start everything, create the pools, deploy the flows; idempotent per project.
    ``progress`` hears each step as it begins (the whole takes ~30 s on 2 cores)."""
    state = _state_file(root)
    if state.exists():
        running = Services(**json.loads(state.read_text()))
        if any(group_alive(pid) for pid in running.pids.values()):
            raise ServiceError(f"services already running ({running.prefect_url}); "
                               "stop them first with `bdc ui --stop`")
        state.unlink()
    services = Services(prefect_url=f"http://127.0.0.1:{prefect_port}",
                        mlflow_url=f"http://127.0.0.1:{mlflow_port}")
    env = _environment(root, services)
    logs = state_dir(root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def launch(name: str, cmd: list[str]) -> subprocess.Popen:
        log = (logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        services.pids[name] = proc.pid
        state.write_text(json.dumps(asdict(services)))  # so --stop works even if we fail
        return proc

    try:
        progress(f"starting the Prefect server ({services.prefect_url}) and the MLflow "
                 f"server ({services.mlflow_url}); logs in {logs}")
        prefect = launch("prefect-server", [_bin("prefect"), "server", "start", "--host",
                                            "127.0.0.1", "--port", str(prefect_port)])
        mlflow = launch("mlflow-server", mlflow_server(root, mlflow_port, mlflow_workers()))
        wait_http(f"{services.prefect_url}/api/health", timeout, prefect,
                   logs / "prefect-server.log")
        wait_http(f"{services.mlflow_url}/health", timeout, mlflow, logs / "mlflow-server.log")
        progress(f"both answer; creating the work pools ({', '.join(POOLS)}) and a worker "
                 "for each")
        for pool in POOLS:
            _run([_bin("prefect"), "work-pool", "create", pool, "--type", "process",
                  "--overwrite"], root, env)
        names = {pool: f"bdc-{pool}-{uuid.uuid4().hex[:8]}" for pool in POOLS}
        workers = {pool: launch(f"worker-{pool}", [_bin("prefect"), "worker", "start",
                                                   "--pool", pool, "--type", "process",
                                                   "--name", name])
                   for pool, name in names.items()}
        progress("deploying the flows (prefect.yaml)")
        _run([_bin("prefect"), "--no-prompt", "deploy", "--all"], root, env)
        progress("waiting for the workers to report")
        deadline = time.monotonic() + timeout
        for pool, proc in workers.items():
            wait_for_worker(services.prefect_url, pool, names[pool], deadline, proc,
                            logs / f"worker-{pool}.log")
    except BaseException:
        stop(root)
        raise
    return services


def worker_online(prefect_url: str, pool: str, name: str) -> bool:
    """Has the worker ``name`` reported to the server (its REST API: bdc stays free of
    Prefect's client)? By name: the server keeps earlier sessions' workers as ONLINE for
    ~90 s after they stopped. Not yet answering, or answering 503 (busy): not yet."""
    request = urllib.request.Request(
        f"{prefect_url}/api/work_pools/{pool}/workers/filter",
        data=b"{}",
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            workers = json.load(response)
    except urllib.error.HTTPError as error:
        if error.code == 503:
            return False
        raise ServiceError(f"{request.full_url} answered {error.code}: "
                           f"{error.read()[:500]!r}") from error
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError):
        return False
    except ValueError as error:
        raise ServiceError(f"{request.full_url} answered no JSON: {error}") from error
    return any(w.get("name") == name and w.get("status") == "ONLINE" for w in workers)


def wait_for_worker(prefect_url: str, pool: str, name: str, deadline: float,
                    proc: subprocess.Popen, log: Path) -> None:
    """Until the pool's worker has reported to the server, or ``deadline`` (monotonic).
    `bdc ui` said "running" as soon as the worker processes were launched, so a run pressed
    in the UI could wait on a worker that was still starting, or that had died, with
    nothing saying so."""
    while True:  # asked at least once, also when an earlier pool's wait used the time up
        if proc.poll() is not None:
            raise ServiceError(f"the {pool} pool's worker exited ({proc.returncode}); see "
                               f"{log}:\n{log_tail(log)}")
        if worker_online(prefect_url, pool, name):
            return
        if time.monotonic() >= deadline:
            raise ServiceError(f"the {pool} pool's worker {name} did not report to "
                               f"{prefect_url} in time; see {log}:\n{log_tail(log)}")
        time.sleep(0.5)


def _run(cmd: list[str], root: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise ServiceError(f"{' '.join(cmd[1:])} failed:\n{proc.stdout[-2000:]}"
                           f"\n{proc.stderr[-2000:]}")


def stop(root: Path, grace: float = 15.0) -> list[str]:
    """Stop every service this project started (their whole process groups)."""
    state = _state_file(root)
    if not state.exists():
        return []
    services = Services(**json.loads(state.read_text()))
    stop_groups(list(services.pids.values()), grace)
    state.unlink()
    return list(services.pids)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.services [--stop] [--prefect-port N] [--mlflow-port N]``, what
    ``bdc ui`` runs: start (or stop) the services and say where they are."""
    from bdc import console
    from bdc.runtime import project_root
    from bdc.tracking import runs_view_url, setup

    parser = argparse.ArgumentParser(prog="bdc ui")
    parser.add_argument("--stop", action="store_true")
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    args = parser.parse_args(argv)
    configure_environment()
    console.setup_logging(False)
    root = project_root()
    try:
        if args.stop:
            stopped = stop(root)
            console.say(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
            return 0
        started = start(root, args.prefect_port, args.mlflow_port, progress=console.say)
    except BDCError as exc:  # what a user can act on, in one line; a bug keeps its trace
        console.error(str(exc))
        return 2
    runs = runs_view_url(started.mlflow_url, setup(root))
    console.say(f"Prefect UI : {started.prefect_url}  (deployment pipeline/pipeline: Run)\n"
                f"MLflow UI  : {runs}  (the runs; MLflow opens on traces otherwise)\n"
                f"workers    : {', '.join(POOLS)} pools; stop all: bdc ui --stop\n"
                f"CLI        : export PREFECT_API_URL={started.prefect_url}/api  (without it "
                "`prefect deployment run` asks a temporary server of its own, which knows no "
                "deployment: 'Deployment ... not found!')\n"
                f"             prefect deployment run pipeline/pipeline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
