"""One MLflow convention for every stage.

Each stage run is an MLflow run named after the stage, tagged with the stage, git commit, a
hash of the parameters the stage reads (what DVC tracks for it) and the profile, holding its
parameters, metrics and key artifacts. When the pipeline runs under Prefect, the flow opens
one parent run and passes its id to the stage processes through ``BDC_MLFLOW_PARENT_RUN_ID``,
so stage runs nest under it; under plain ``dvc repro`` they stand alone.

The store defaults to SQLite plus an artifact folder under ``var/mlflow`` (absolute paths,
so ``mlflow ui`` from the project sees everything); ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bdc.errors import BDCError
from bdc.jsonl import read_jsonl
from bdc.runtime import project_root, state_dir

log = logging.getLogger(__name__)
EXPERIMENT = "bdc"
# MLflow 3's UI opens an experiment without this tag in its GenAI view ("Evaluations", an
# assistant panel) where the runs' metrics and charts are not shown
KIND = ("mlflow.experimentKind", "custom_model_development")
PARENT_ENV = "BDC_MLFLOW_PARENT_RUN_ID"


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{state_dir(root) / 'mlflow' / 'mlflow.db'}"


def artifact_root(root: Path | None = None) -> str:
    return (state_dir(root) / "mlflow" / "artifacts").resolve().as_uri()


class StoreUnreadable(BDCError):
    """The MLflow store cannot be opened (a truncated or corrupted database file)."""


def setup(root: Path | None = None) -> str:
    """Point MLflow at the project's store and the ``bdc`` experiment; the experiment id."""
    import mlflow

    (state_dir(root) / "mlflow").mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's and MLflow's many error types
        store = uri.removeprefix("sqlite:///")
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreUnreadable(
            f"{store}: the MLflow store cannot be read ({why}). A damaged database file "
            "(e.g. 'database disk image is malformed') can be moved aside to start a new "
            "one; a locked, outdated or unreachable store needs its own fix, or set "
            "MLFLOW_TRACKING_URI") from None
    if experiment is None:
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # lost a creation race
            mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_root(root))
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment.tags.get(KIND[0]) != KIND[1]:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *KIND)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


def _pid_namespace() -> str:
    """This process's PID namespace: containers sharing a host name and a store number
    their processes apart, so a pid alone names no process outside its namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "unknown"


def owner_tags() -> dict[str, str]:
    """The process that holds a run open, as tags: what :func:`end_orphans` checks."""
    return {"bdc.host": socket.gethostname(), "bdc.pid": str(os.getpid()),
            "bdc.pid_namespace": _pid_namespace()}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def end_orphans(experiment_id: str) -> list[str]:
    """Mark KILLED the runs left RUNNING by a process of this machine (host and PID
    namespace) that is gone (a stage killed with -9, a lost session): MLflow kept them
    RUNNING forever. Runs of other machines or containers, and runs whose process lives, are
    left alone. The ids ended."""
    from mlflow.tracking import MlflowClient

    client, ended = MlflowClient(), []
    host, namespace = socket.gethostname(), _pid_namespace()
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'",
                                  max_results=1000):
        tags = run.data.tags
        pid = tags.get("bdc.pid", "")
        if tags.get("bdc.host") == host and tags.get("bdc.pid_namespace") == namespace \
                and pid.isdigit() and _gone(int(pid)):
            client.set_tag(run.info.run_id, "bdc.ended", f"its process (pid {pid}) was gone "
                           "when a later run started: killed")
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    if ended:
        log.info("MLflow: %d run(s) of killed processes marked KILLED", len(ended))
    return ended


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists of mappings get their index."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out


def metric_name(key: str) -> str:
    """Letters, digits, ``_ - .`` only: ``pass@1`` becomes ``pass_at_1``, ``by_difficulty.n/a``
    ``by_difficulty.n_a``. MLflow allows spaces and ``/`` too, but its chart view groups
    metrics by what comes before a ``/`` and sorts names with spaces first, so such names
    led the page with sections of one useless chart each."""
    name = re.sub(r"[^\w\-.]+", "_", key.replace("@", "_at_"))
    return re.sub(r"_+", "_", name).strip("_")


def rounded(value: Any, digits: int = 4) -> Any:
    """A float as a person reads it in a table (``0.19999999999999996`` -> ``0.2``); the
    metrics keep full precision for code."""
    return round(value, digits) if isinstance(value, float) else value


def runs_view_url(ui_url: str, experiment_id: str, run_id: str | None = None,
                  page: str | None = None) -> str:
    """The MLflow UI's page for the experiment's runs (or one run), in its machine-learning
    view: MLflow 3's default workflow is GenAI (a per-browser switch), which opens an
    experiment on its traces and a run as an "Evaluation run" beside an assistant panel.
    ``page``: a page of the run's (``artifacts/docs/index.html``)."""
    base = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    if run_id:
        base += f"/{run_id}" + (f"/{page}" if page else "")
    return f"{base}?workflowType=machine_learning"


def describe(doc: str | None) -> str:
    """A stage run's description in MLflow: the first paragraph of the docstring of the stage
    module that starts it, so a run says what it is."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


# what the pipelines write into git-tracked files (DVC's metrics, plots and lock files,
# under each pipeline's data/): a run changes them, so they do not make its code "dirty"
PIPELINE_OUTPUTS = (":(exclude,glob)**/data/**", ":(exclude,glob)data/**",
                    ":(exclude,glob)**/dvc.lock", ":(exclude)dvc.lock")


def git_commit(root: Path | None = None) -> str:
    """HEAD, with ``-dirty`` when tracked code or settings differ from it (not the
    pipelines' own outputs: every run from a fresh clone rewrote its metrics and lock)."""
    root = root or project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", *PIPELINE_OUTPUTS],
                               cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


class StageRun:
    """What a stage logs while it runs; a thin layer over the active MLflow run."""

    def __init__(self, run) -> None:
        self.run_id: str = run.info.run_id

    def metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        import mlflow

        numeric = {metric_name(k): float(v) for k, v in flatten(metrics).items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        mlflow.log_metrics(numeric, step=step)

    def table(self, rows: list[dict], name: str) -> None:
        """A list of records as an MLflow table (``name`` ends in ``.json``)."""
        import mlflow

        columns = sorted({k for row in rows for k in row})
        mlflow.log_table({c: [rounded(row.get(c)) for row in rows] for c in columns},
                         artifact_file=name)

    def dataset(self, path: str | Path, name: str, context: str) -> None:
        """A JSONL file (problems, SFT records) as an MLflow dataset input of the run: its
        name, source, digest, row count and schema (not its contents)."""
        import mlflow
        import pandas as pd

        rows = list(read_jsonl(path, dict))  # a malformed line is named, file and line
        frame = pd.DataFrame([{k: v if isinstance(v, str | int | float | bool) or v is None
                               else json.dumps(v, sort_keys=True) for k, v in row.items()}
                              for row in rows])
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice (for "" and "file:" schemes), so
            # every path "can be interpreted in multiple ways": the same class both times
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(frame, source=str(Path(path).resolve()), name=name)
        mlflow.log_input(dataset, context=context)

    def figure(self, figure, name: str) -> None:
        import mlflow

        mlflow.log_figure(figure, name)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=folder)

    def artifacts(self, local_dir: str | Path, folder: str | None = None) -> None:
        """A whole folder (Data Docs, an adapter) under ``folder`` in the run."""
        import mlflow

        mlflow.log_artifacts(str(local_dir), artifact_path=folder)

    def tag(self, key: str, value: str) -> None:
        import mlflow

        mlflow.set_tag(key, value)

    def describe(self, text: str) -> None:
        """The run's description (markdown), replacing the stage docstring's: for a run
        whose answer is only known at its end (evaluate's verdict)."""
        self.tag("mlflow.note.content", text)


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], profile: str,
              root: Path | None = None, doc: str | None = None) -> Iterator[StageRun]:
    """An MLflow run for one stage, nested under the pipeline's run when there is one;
    described by ``doc`` (the stage module passes its own docstring)."""
    import mlflow

    end_orphans(setup(root))
    tags = {"bdc.stage": stage, "bdc.git_commit": git_commit(root),
            "bdc.params_hash": params_hash(params), "bdc.profile": profile, **owner_tags()}
    parent = os.environ.get(PARENT_ENV) or None
    with mlflow.start_run(run_name=stage, tags=tags, parent_run_id=parent,
                          description=describe(doc) or None) as run:
        flat = {k: json.dumps(v) if isinstance(v, list | dict) else v
                for k, v in flatten(params).items()}
        mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})
        yield StageRun(run)


def prompt_signature(optional: tuple[str, ...] = ()):
    """A text-in, program-out pyfunc's declared signature: a ``prompt`` column (and any
    ``optional`` string columns) in, one string per row out, ``max_new_tokens`` a param."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"),
                       *(ColSpec("string", name, required=False) for name in optional)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 256)]))


def log_registered(registered: str, summary: str, tags: Mapping[str, Any], **log_model) -> str:
    """``mlflow.pyfunc.log_model`` into the active run, registered as ``registered`` with a
    description and tags on the model and on the new version (a registry entry said nothing
    of what it was); its version."""
    import mlflow

    with warnings.catch_warnings():  # the signature is declared; an example adds nothing
        warnings.filterwarnings("ignore", ".*An input example was not provided")
        info = mlflow.pyfunc.log_model(registered_model_name=registered, **log_model)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.update_registered_model(registered, description=summary)
    run = mlflow.active_run()
    version_tags = {"bdc.git_commit": git_commit(), **(
        {"bdc.profile": run.data.tags.get("bdc.profile", "")} if run else {}), **tags}
    for key, value in version_tags.items():
        client.set_model_version_tag(registered, version, key, str(value))
    client.set_registered_model_tag(registered, "bdc.kind", registered.removeprefix("bdc-"))
    client.update_model_version(registered, version, description=summary + " " + ", ".join(
        f"{k}: {v}" for k, v in tags.items()) + ".")
    return version
