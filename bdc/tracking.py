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
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bdc.runtime import pipeline_folder, project_root, state_dir

log = logging.getLogger(__name__)
EXPERIMENT = "bdc"
PARENT_ENV = "BDC_MLFLOW_PARENT_RUN_ID"


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{state_dir(root) / 'mlflow' / 'mlflow.db'}"


def artifact_root(root: Path | None = None) -> str:
    return (state_dir(root) / "mlflow" / "artifacts").resolve().as_uri()


def setup(root: Path | None = None) -> str:
    """Point MLflow at the project's store and the ``bdc`` experiment; the experiment id."""
    import mlflow

    (state_dir(root) / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(root))
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # lost a creation race
            mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_root(root))
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


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


def runs_view_url(ui_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page for the experiment's runs (or one run), in its machine-learning
    view: MLflow 3 opens an experiment on its GenAI traces view, where runs do not show."""
    base = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}"
    if run_id:
        return f"{base}/runs/{run_id}"
    return f"{base}/runs?workflowType=machine_learning"


def stage_description(stage: str) -> str:
    """A stage run's description in MLflow: the first paragraph of its stage module's
    docstring (``bdc/stages/<stage>.py``), so a run says what it is."""
    import importlib

    try:
        doc = importlib.import_module(f"bdc.stages.{stage.replace('-', '_')}").__doc__ or ""
    except ImportError:
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit(root: Path | None = None) -> str:
    root = root or project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
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

        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
        frame = pd.DataFrame([{k: v if isinstance(v, str | int | float | bool) or v is None
                               else json.dumps(v, sort_keys=True) for k, v in row.items()}
                              for row in rows])
        mlflow.log_input(mlflow.data.from_pandas(frame, source=str(Path(path).resolve()),
                                                 name=name), context=context)

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


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], profile: str,
              root: Path | None = None) -> Iterator[StageRun]:
    """An MLflow run for one stage, nested under the pipeline's run when there is one."""
    import mlflow

    setup(root)
    tags = {"bdc.stage": stage, "bdc.git_commit": git_commit(root),
            "bdc.params_hash": params_hash(params), "bdc.profile": profile}
    parent = os.environ.get(PARENT_ENV) or None
    with mlflow.start_run(run_name=stage, tags=tags, parent_run_id=parent,
                          description=stage_description(stage) or None) as run:
        flat = {k: json.dumps(v) if isinstance(v, list | dict) else v
                for k, v in flatten(params).items()}
        mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})
        yield StageRun(run)


@contextlib.contextmanager
def pipeline_run(profile: str, tags: Mapping[str, str] | None = None,
                 root: Path | None = None) -> Iterator[str]:
    """The parent run of one pipeline run; yields its id for the stage processes. At the end
    it holds what the pipeline produced: the final table (``data/eval/table.md`` of the
    profile's pipeline, as its description and an artifact, with the table's headline
    numbers as metrics) and which stages ran, so a run in which every stage was up to date
    is not an empty run.

    Made through the client, not ``mlflow.start_run``: the flow process keeps no active
    run, so nothing else in it can log into the parent by accident."""
    from mlflow.tracking import MlflowClient

    experiment_id = setup(root)
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name="pipeline", tags={
        "bdc.stage": "pipeline", "bdc.git_commit": git_commit(root), "bdc.profile": profile,
        "mlflow.note.content": "The pipeline's stages run under Prefect; their runs nest "
                               "under this one.", **(tags or {})})
    try:
        yield run.info.run_id
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    try:
        data = (root or project_root()) / pipeline_folder(profile) / "data"
        summarize_pipeline(client, run.info.run_id, data)
    except Exception as exc:  # noqa: BLE001 - the stages' work is done; a summary is extra
        log.warning("pipeline run %s: could not add its summary: %s", run.info.run_id, exc)
    finally:
        client.set_terminated(run.info.run_id, "FINISHED")


def summarize_pipeline(client, run_id: str, data: Path) -> None:
    """The final table (under the pipeline's ``data`` folder) and the stages that ran, on
    the pipeline's parent run."""
    ran = sorted(r.data.tags.get("bdc.stage", "?") for r in client.search_runs(
        [client.get_run(run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{run_id}'"))
    table = data / "eval" / "table.md"
    note = (f"Stages that ran: {', '.join(ran)}." if ran else
            "Every stage was up to date: DVC ran nothing; the table below is the current "
            "one.") + " Stage runs nest under this run.\n\n"
    if table.exists():
        note += table.read_text()
        client.log_artifact(run_id, str(table))
        headline = data / "eval" / "table.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            rows = json.loads(headline.read_text())["solvers"]
            for name, row in rows.items():
                for key in ("strict_accuracy", "pass_rate"):  # {mean, std} over seeds
                    for stat, value in (row.get(key) or {}).items():
                        client.log_metric(run_id, metric_name(f"{name}.{key}.{stat}"),
                                          float(value))
    client.set_tag(run_id, "mlflow.note.content", note)
    client.set_tag(run_id, "bdc.stages_ran", ",".join(ran) or "none")


def find_stage_run(stage: str, parent_run_id: str | None, since_ms: int,
                   root: Path | None = None, profile: str = "mini"):
    """The newest run of ``stage`` of ``profile`` started after ``since_ms`` (under the
    parent, if any); None when DVC found the stage up to date and did not run it."""
    import mlflow

    experiment_id = setup(root)
    query = (f"tags.`bdc.stage` = '{stage}' and tags.`bdc.profile` = '{profile}' "
             f"and attributes.start_time >= {since_ms}")
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = mlflow.search_runs([experiment_id], filter_string=query, max_results=1,
                              order_by=["attributes.start_time DESC"], output_format="list")
    return runs[0] if runs else None


def last_stage_run(stage: str, root: Path | None = None, profile: str = "mini"):
    """The newest run of ``stage`` of ``profile``, wherever it ran (None if it never ran)."""
    import mlflow

    query = f"tags.`bdc.stage` = '{stage}' and tags.`bdc.profile` = '{profile}'"
    runs = mlflow.search_runs([setup(root)], filter_string=query,
                              max_results=1, order_by=["attributes.start_time DESC"],
                              output_format="list")
    return runs[0] if runs else None


def metrics_table(metrics: Mapping[str, Any], limit: int = 40) -> str:
    """Numeric metrics as a markdown table, rounded where a person reads them."""
    flat = [(k, v) for k, v in sorted(flatten(metrics).items())
            if isinstance(v, int | float) and not isinstance(v, bool)]
    rows = "\n".join(f"| {k} | {rounded(float(v)):.4g} |" for k, v in flat[:limit])
    more = f"\n\n({len(flat) - limit} more in the metrics file)" if len(flat) > limit else ""
    return f"| metric | value |\n|---|---|\n{rows}{more}\n"


def run_summary_markdown(stage: str, run, ui_url: str, root: Path | None = None,
                         profile: str = "mini") -> str:
    """A short human summary of a stage's MLflow run (Prefect artifact). A stage DVC found
    up to date did not run: its current metrics (``<pipeline>/data/metrics/<stage>.json``)
    and a link to its last MLflow run instead."""
    if run is None:
        root = root or project_root()
        text = (f"### {stage}\n\nUp to date: DVC found nothing changed (or restored the "
                "outputs from its run cache), so the stage did not run this time.\n")
        last = last_stage_run(stage, root, profile)
        if last is not None:
            link = runs_view_url(ui_url, last.info.experiment_id, last.info.run_id)
            text += f"\nIts last MLflow run: [{last.info.run_id}]({link})\n"
        current = (root / pipeline_folder(profile) / "data" / "metrics" /
                   f"{stage.replace('-', '_')}.json")
        if current.exists():
            text += "\nCurrent metrics:\n\n" + metrics_table(json.loads(current.read_text()))
        return text
    base = ui_url.rstrip("/")
    link = runs_view_url(ui_url, run.info.experiment_id, run.info.run_id)
    text = (f"### {stage}\n\nMLflow run: [{run.info.run_id}]({link}) "
            f"({run.info.status.lower()}); all runs: "
            f"[{runs_view_url(ui_url, run.info.experiment_id)}]"
            f"({runs_view_url(ui_url, run.info.experiment_id)})\n")
    report = run.data.tags.get("bdc.report")  # e.g. validate's Data Docs
    if report:
        text += (f"\nReport: [{report}]({base}/get-artifact?path={report}"
                 f"&run_uuid={run.info.run_id})\n")
    summary = run.data.tags.get("bdc.summary")  # a stage's own table (evaluate)
    if summary:
        import mlflow

        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                   artifact_path=summary)
        return text + "\n" + Path(path).read_text()
    return text + "\n" + metrics_table(run.data.metrics)
