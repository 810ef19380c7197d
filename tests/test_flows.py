"""The Prefect flows against a real Prefect server (the test harness starts one)."""

from __future__ import annotations

import asyncio

import mlflow
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

from bdc import tracking

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


async def _artifacts(key: str):
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_pipeline_flow_runs_stages_with_artifacts_and_nested_runs(prefect_server, project):
    from flows.pipeline import pipeline

    results = pipeline()
    assert [r["stage"] for r in results] == ["prepare", "pretrain", "explore", "validate",
                                             "disentangle", "experts", "customize",
                                             "evaluate"]
    assert all(r["ran"] for r in results)
    assert (project / "data/models/planner/model.safetensors").exists()
    assert (project / "data/problems/explore.jsonl").exists()
    (artifact,) = [a for a in asyncio.run(_artifacts("stage-prepare"))
                   if results[0]["mlflow_run_id"] in (a.data or "")]
    assert "explore.problems" in artifact.data and artifact.type == "markdown"
    experiment = tracking.setup(project)
    runs = mlflow.search_runs([experiment], output_format="list")
    (parent,) = [r for r in runs if r.data.tags["bdc.stage"] == "pipeline"]
    for name in ("prepare", "pretrain", "explore", "validate", "disentangle", "experts",
                 "customize", "evaluate"):
        (stage,) = [r for r in runs if r.data.tags["bdc.stage"] == name]
        assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
        if name == "pretrain":
            assert "models.planner.explore.pass_at_1" in stage.data.metrics
        if name == "explore":
            assert "hidden_solve_rate" in stage.data.metrics
        if name == "evaluate":  # the whole pipeline ran on real (ci) data to the table
            assert "customized.strict_accuracy" in stage.data.metrics
    assert (project / "data/eval/table.md").exists()
    assert parent.info.status == "FINISHED" and "prefect.flow_run_id" in parent.data.tags

    # a second run: DVC finds prepare up to date, so no new stage run; the artifact says so
    again = pipeline()
    assert not any(r["ran"] for r in again)
    assert any("Up to date" in (a.data or "") for a in asyncio.run(_artifacts("stage-prepare")))


def test_failing_stage_fails_the_flow_with_its_error(prefect_server, project):
    from flows.pipeline import StageFailed, pipeline

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["problems"]["explore"] = [{"name": "apps", "path": "/no/such/apps"}]
    params["orchestration"]["retries"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(StageFailed, match=r"stage prepare failed(.|\n)*/no/such/apps"):
        pipeline()
    experiment = tracking.setup(project)
    (parent,) = [r for r in mlflow.search_runs([experiment], output_format="list")
                 if r.data.tags["bdc.stage"] == "pipeline"]
    assert parent.info.status == "FAILED"


def test_stage_timeout_kills_the_stage_process(prefect_server, project, tmp_path):
    from flows.pipeline import StageFailed, run_stage

    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    marker = tmp_path / "still-running"
    spec["stages"]["sleepy"] = {"cmd": f"sleep 30 && touch {marker}"}
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    from prefect import flow

    @flow
    def one():
        return run_stage("sleepy", timeout_s=2)

    with pytest.raises(StageFailed, match="killed"):
        one()
    import subprocess

    leftover = subprocess.run(["pgrep", "-f", f"touch {marker}"], capture_output=True)
    assert leftover.returncode == 1  # no process of the stage survived
