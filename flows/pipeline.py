"""Prefect flows over the DVC pipeline: orchestration only, no ML logic.

Prefect owns execution (order, retries, timeouts, dispatch of GPU stages to the ``gpu`` work
pool, the UI); DVC decides whether a stage is stale (a task runs ``dvc repro`` for its stage
and Prefect caches nothing of its own); MLflow holds what each stage logged. One parent MLflow
run per pipeline run; the stage processes nest their runs under it via the environment.
Each profile is its own DVC pipeline (``bdc.runtime.pipeline_folder``): mini is the project's
``dvc.yaml``, paper is ``paper/dvc.yaml`` (no ``pretrain``; its GPU stages go to the ``gpu``
pool).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Literal, get_args

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from bdc import artifacts, tracking
from bdc.config import Params, load_params
from bdc.processes import stop_groups
from bdc.runtime import configure_environment, pipeline_folder, project_root
from flows import runs

# The stages of dvc.yaml, in order: a choice in the Prefect UI's run form, not free text
# (tests/test_flows.py checks it against dvc.yaml; paper/dvc.yaml has them but pretrain).
Stage = Literal[artifacts.STAGES]  # Literal[("a", "b")] is Literal["a", "b"]
STAGES: tuple[str, ...] = get_args(Stage)
Profile = Literal["mini", "small", "paper"]


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero or ran past its timeout."""


def _project() -> Path:
    root = project_root()
    configure_environment(root)
    return root


def _params(root: Path, profile: str) -> Params:
    path = root / pipeline_folder(profile) / "params.yaml"
    params = load_params(path)
    if params.profile != profile:
        raise ValueError(f"{path}: profile is {params.profile!r}, but it is the {profile} "
                         "pipeline's settings")
    return params


def stage_names(root: Path, profile: str = "mini") -> list[str]:
    """Stages of the profile's dvc.yaml, in its order (declared in dependency order)."""
    path = root / pipeline_folder(profile) / "dvc.yaml"
    return list(yaml.safe_load(path.read_text())["stages"])


def dvc_target(stage: str, profile: str) -> str:
    """``dvc repro``'s name of a stage: ``explore`` (dvc.yaml), ``paper/dvc.yaml:explore``."""
    folder = pipeline_folder(profile)
    return stage if folder == Path(".") else f"{(folder / 'dvc.yaml').as_posix()}:{stage}"


def _known(root: Path, profile: str, stages: list[str]) -> list[str]:
    declared = stage_names(root, profile)
    unknown = sorted(set(stages) - set(declared))
    if unknown:
        raise ValueError(f"stages {unknown} are not in the {profile} pipeline "
                         f"({root / pipeline_folder(profile) / 'dvc.yaml'}): {declared}")
    return declared


# DVC's closing advice to a person at a terminal ("To track the changes with git, run: git
# add dvc.lock", "To enable auto staging ..."): in a flow's log it is noise (and blank lines)
GIT_HINT = ("To track the changes with git, run:", "To enable auto staging, run:",
            "git add ", "dvc config core.autostage")


def git_hint(line: str) -> bool:
    return not line.strip() or line.strip().startswith(GIT_HINT)


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE,
      persist_result=False)
def run_stage(stage: str, parent_run_id: str | None = None, single: bool = True,
              timeout_s: float | None = None, profile: str = "mini") -> dict:
    """``dvc repro`` one stage of the profile's pipeline in its own process group, logging
    its output as it comes.

    A timeout kills the whole process group, so nothing the stage started lives on; so do
    Ctrl-C and SIGTERM to this flow's process (how Prefect cancels a run): the group is its
    own, so no signal sent to the flow reaches it. (A SIGKILL to the flow leaves it running.)
    """
    logger = get_run_logger()
    root = _project()
    params = _params(root, profile)
    _known(root, profile, [stage])
    timeout_s = timeout_s or params.orchestration.stage_timeout_s
    cmd = ["dvc", "repro", *(["--single-item"] if single else []), dvc_target(stage, profile)]
    env = {**os.environ, tracking.PARENT_ENV: parent_run_id or ""}
    started_ms = int(time.time() * 1000)
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail: deque[str] = deque(maxlen=40)

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if not git_hint(line):
                logger.info("[%s] %s", stage, line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    try:
        reader.start()
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_groups([proc.pid], grace=0)  # SIGKILL at once, and wait for the whole group
        proc.wait()
        raise StageFailed(f"stage {stage} ran past {timeout_s:.0f}s and was killed") from None
    except BaseException:  # interrupted, cancelled: SIGTERM the stage, SIGKILL what stays
        logger.warning("stopping stage %s (process group %d)", stage, proc.pid)
        # a second Ctrl-C must not cut the cleanup short of its SIGKILL: held until done
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            stop_groups([proc.pid], grace=10)
            proc.wait()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    finally:
        reader.join(timeout=5)
    if code != 0:
        raise StageFailed(f"stage {stage} failed (exit {code}):\n" + "\n".join(tail))
    run = runs.find_stage_run(stage, parent_run_id, started_ms, root, profile)
    ui_url = os.environ.get("BDC_MLFLOW_UI") or params.orchestration.mlflow_ui
    create_markdown_artifact(
        runs.run_summary_markdown(stage, run, ui_url, root, profile),
        key=artifact_key(stage, profile), description=f"DVC stage {stage} ({profile})")
    return {"stage": stage, "ran": run is not None,
            "mlflow_run_id": run.info.run_id if run else None}


def artifact_key(stage: str, profile: str) -> str:
    """A stage's Prefect artifact key: ``stage-explore`` (mini), ``paper-stage-explore``, so
    the newest artifact of a key is always the same pipeline's."""
    prefix = "" if profile == "mini" else f"{profile}-"
    return f"{prefix}stage-{stage}".replace("_", "-")


def _gpu_pool(stage: str, orchestration) -> str | None:
    """The GPU work pool ``stage`` must go to, or None: not a GPU stage, no pool set, or
    this flow run is already on that pool (the dispatched stage flow itself)."""
    pool = orchestration.gpu_pool
    here = get_run_context().flow_run.work_pool_name
    return pool if pool and stage in orchestration.gpu_stages and here != pool else None


def _dispatch_gpu(stage: str, pool: str, parent_run_id: str | None, profile: str,
                  single: bool = True) -> dict:
    """Run the stage as a deployment on a worker of the GPU pool and wait for it."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(f"stage/stage-{pool}", parameters={
        "stage": stage, "parent_run_id": parent_run_id, "single": single, "profile": profile})
    if not flow_run.state or not flow_run.state.is_completed():
        raise StageFailed(f"stage {stage} on the {pool} pool ended "
                          f"{flow_run.state.name if flow_run.state else 'without a state'}")
    return {"stage": stage, "flow_run_id": str(flow_run.id)}


@flow(name="stage", flow_run_name="stage-{stage}")
def stage_flow(stage: Stage, parent_run_id: str | None = None, single: bool = False,
               profile: Profile = "mini") -> dict:
    """One DVC stage (with its stale upstream stages unless ``single``).

    Args:
        stage: the DVC stage to run (of the profile's dvc.yaml)
        parent_run_id: the MLflow run to nest the stage's run under (the pipeline sets it)
        single: run only this stage, not the stale stages before it
        profile: mini (dvc.yaml, params.yaml), small (small/: packaged real LLMs on CPU)
            or paper (paper/dvc.yaml, paper/params.yaml)
    """
    return one_stage(stage, parent_run_id, single, profile)


def one_stage(stage: str, parent_run_id: str | None = None, single: bool = False,
              profile: str = "mini") -> dict:
    """The body of a one-stage flow, run in the calling flow (not as a subflow of it), so the
    stage's task run, logs and artifact are on the run page of the flow a person started:
    the stage on a GPU worker when it is a GPU stage started elsewhere, else here."""
    root = _project()
    orchestration = _params(root, profile).orchestration
    pool = _gpu_pool(stage, orchestration)  # started on a cpu worker or from a shell
    if pool:
        return _dispatch_gpu(stage, pool, parent_run_id, profile, single)
    return run_stage.with_options(retries=orchestration.retries,
                                  retry_delay_seconds=orchestration.retry_delay_s)(
        stage, parent_run_id, single, profile=profile)


@flow(name="pipeline")
def pipeline(stages: tuple[Stage, ...] = (), profile: Profile = "mini") -> list[dict]:
    """Every DVC stage of the profile's pipeline in order, under one parent MLflow run (the
    place to start; every other setting lives in the profile's params.yaml).

    Args:
        stages: run only these stages, in the pipeline's order (none chosen: every stage);
            each runs only if DVC finds it stale
        profile: mini (dvc.yaml, params.yaml), small (small/: packaged real LLMs on CPU)
            or paper (paper/dvc.yaml, paper/params.yaml: real benchmarks and models, no
            pretrain, GPU stages on the gpu pool)
    """
    root = _project()
    params = _params(root, profile)
    orchestration = params.orchestration
    declared = _known(root, profile, list(stages or ()))
    names = [s for s in declared if not stages or s in stages]
    flow_run_id = str(get_run_context().flow_run.id)
    results = []
    with runs.pipeline_run(params.profile, {"prefect.flow_run_id": flow_run_id},
                               root) as parent_run_id:
        for stage in names:
            pool = _gpu_pool(stage, orchestration)
            if pool:
                results.append(_dispatch_gpu(stage, pool, parent_run_id, profile))
            else:
                results.append(run_stage.with_options(
                    retries=orchestration.retries,
                    retry_delay_seconds=orchestration.retry_delay_s)(
                    stage, parent_run_id, profile=profile))
    return results
