"""The MLflow side of orchestration: the parent run of one pipeline run (its stages' runs nest
under it, and it ends holding the final table), and the summaries of stage runs that the
flows attach to Prefect as artifacts. Stages log through ``bdc.tracking``; only flows use this.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bdc import artifacts
from bdc.evaluate.claims import headline_metrics, verdict
from bdc.runtime import pipeline_folder, project_root
from bdc.tracking import (
    end_orphans,
    flatten,
    git_commit,
    owner_tags,
    rounded,
    runs_view_url,
    setup,
)

log = logging.getLogger(__name__)


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
    end_orphans(experiment_id)
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name="pipeline", tags={
        "bdc.stage": "pipeline", "bdc.git_commit": git_commit(root), "bdc.profile": profile,
        **owner_tags(),
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
    the pipeline's parent run: the verdict first, the table as an artifact, the headline
    numbers under the evaluate run's keys."""
    from mlflow.entities import Metric

    ran = sorted(r.data.tags.get("bdc.stage", "?") for r in client.search_runs(
        [client.get_run(run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{run_id}'"))
    table = data / "eval" / artifacts.TABLE_MD
    note = (f"Stages that ran: {', '.join(ran)}." if ran else
            "Every stage was up to date: DVC ran nothing; the results here are the "
            "current ones.") + " Stage runs nest under this run.\n\n"
    headline = data / "eval" / artifacts.TABLE_JSON
    if table.exists():
        client.log_artifact(run_id, str(table))
        try:
            results = json.loads(headline.read_text())
            first = verdict(results)
            # the evaluate run's keys: one scheme, charted together
            client.log_batch(run_id, metrics=[
                Metric(key, value, int(time.time() * 1000), 0)
                for key, value in headline_metrics(results).items()])
            note = first + "\n\n" + note + f"The whole table: the artifact {artifacts.TABLE_MD}.\n"
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a table of another version
            log.warning("pipeline run %s: no verdict from %s (%s): the table instead", run_id,
                        headline, exc)
            note += table.read_text()
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
    link = runs_view_url(ui_url, run.info.experiment_id, run.info.run_id)
    text = (f"### {stage}\n\nMLflow run: [{run.info.run_id}]({link}) "
            f"({run.info.status.lower()}); all runs: "
            f"[{runs_view_url(ui_url, run.info.experiment_id)}]"
            f"({runs_view_url(ui_url, run.info.experiment_id)})\n")
    report = run.data.tags.get("bdc.report")  # e.g. validate's Data Docs
    if report:  # MLflow's get-artifact route sends HTML as a download: its artifact view
        # shows it in the page; the stage's own copy opens whole in a browser
        local = run.data.tags.get("bdc.report_file")
        shown = runs_view_url(ui_url, run.info.experiment_id, run.info.run_id,
                              f"artifacts/{report}")
        text += (f"\nReport: [{report}]({shown}) (in MLflow)"
                 + (f"; the whole site: open `{local}` in a browser" if local else "") + "\n")
    summary = run.data.tags.get("bdc.summary")  # a stage's own table (evaluate)
    if summary:
        import mlflow

        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                   artifact_path=summary)
        return text + "\n" + Path(path).read_text()
    return text + "\n" + metrics_table(run.data.metrics)
