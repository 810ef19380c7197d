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

    # a second run (of the first stage: what matters is DVC's decision, not eight stages of
    # it): DVC finds prepare up to date, so no new stage run; the artifact says so
    again = pipeline(["prepare"])
    assert not any(r["ran"] for r in again)
    assert any("Up to date" in (a.data or "") for a in asyncio.run(_artifacts("stage-prepare")))
    evaluate_on_vllm_equals_transformers(project)


def evaluate_on_vllm_equals_transformers(project):
    """`evaluate.engine: vllm` on the pipeline's own experts and hypernetwork (real vLLM,
    the customized solver as folded adapters): greedy, every solver's programs and token
    counts equal those of the pipeline's own (transformers) evaluate run, so the two tables
    are the same."""
    import json
    import subprocess
    from pathlib import Path

    python = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    assert python.exists(), f"{python} is missing: `make test` builds it"
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["evaluate"]["temperature"] == 0.0  # the ci profile's: greedy
    params["evaluate"].update(engine="vllm", system2=False)
    params["vllm"].update(python=str(python), max_model_len=256)
    (project / "vllm.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run(
        ["bdc", "evaluate-solvers", "--params", "vllm.yaml", "--out-dir", "var/eval-vllm",
         "--metrics", "var/eval-vllm.json", "--plots-dir", "var/plots-vllm"], cwd=project,
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    samples = {}
    for engine, folder in (("hf", "data/eval"), ("vllm", "var/eval-vllm")):
        rows = [json.loads(line) for line in
                (project / folder / "samples.jsonl").read_text().splitlines()]
        samples[engine] = {(r["solver"], r["problem_id"]): (r["program"], r["tokens"])
                           for r in rows}
    assert {s for s, _ in samples["hf"]} >= {"base", "full", "customized", "arrow"}
    assert samples["vllm"] == samples["hf"]
    assert "Generated on vLLM" in (project / "var/eval-vllm/table.md").read_text()
