"""The MLflow convention on a real SQLite store inside a throwaway project."""

from __future__ import annotations

import mlflow
import pytest

from bdc import tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    return tmp_path


def only_run(root, **filters):
    runs = mlflow.search_runs([tracking.setup(root)], output_format="list")
    return [r for r in runs if all(r.data.tags.get(k) == v for k, v in filters.items())]


def test_stage_run_logs_params_metrics_artifacts_and_tags(store, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (tmp_path / "m.json").write_text("{}")
    with tracking.stage_run("prepare", {"problems": {"split": {"min_tests": 2}}}, "mini",
                            root=store) as run:
        run.metrics({"explore": {"problems": 3, "by_source": {"he": 3}}, "name": "skip-me"})
        run.table([{"pool": "explore", "n": 3}, {"pool": "test", "n": 1}], "counts.json")
        fig, ax = plt.subplots()
        ax.plot([1, 2])
        run.figure(fig, "plot.png")
        run.artifact(tmp_path / "m.json")
    (r,) = only_run(store, **{"bdc.stage": "prepare"})
    assert r.info.run_name == "prepare" and r.info.status == "FINISHED"
    assert r.data.params == {"problems.split.min_tests": "2"}
    assert r.data.metrics == {"explore.problems": 3.0, "explore.by_source.he": 3.0}
    tags = r.data.tags
    assert tags["bdc.profile"] == "mini" and len(tags["bdc.params_hash"]) == 16
    assert tags["bdc.git_commit"] and "mlflow.parentRunId" not in tags
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)}
    assert artifacts == {"counts.json", "plot.png", "m.json"}
    # the store and artifacts are inside the project, at absolute locations
    assert r.info.artifact_uri.startswith((store / "var" / "mlflow").as_uri())
    assert (store / "var" / "mlflow" / "mlflow.db").exists()


def test_stage_runs_nest_under_the_pipeline_run(store, monkeypatch):
    with tracking.pipeline_run("mini", root=store) as parent:
        monkeypatch.setenv(tracking.PARENT_ENV, parent)
        with tracking.stage_run("prepare", {}, "mini", root=store):
            pass
    (child,) = only_run(store, **{"bdc.stage": "prepare"})
    (pipe,) = only_run(store, **{"bdc.stage": "pipeline"})
    assert child.data.tags["mlflow.parentRunId"] == pipe.info.run_id == parent
    assert tracking.find_stage_run("prepare", parent, 0, store).info.run_id == child.info.run_id
    assert tracking.find_stage_run("prepare", "another-parent", 0, store) is None


def test_failed_pipeline_run_is_marked_failed(store):
    with pytest.raises(RuntimeError), tracking.pipeline_run("mini", root=store):
        raise RuntimeError("stage broke")
    (pipe,) = only_run(store, **{"bdc.stage": "pipeline"})
    assert pipe.info.status == "FAILED"


def test_tracking_uri_override(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'other.db'}")
    assert tracking.tracking_uri(store).endswith("other.db")


def test_flatten_and_hash():
    assert tracking.flatten({"a": {"b": 1}, "l": [{"x": 2}], "v": [1, 2]}) == \
        {"a.b": 1, "l.0.x": 2, "v": [1, 2]}
    assert tracking.params_hash({"a": 1, "b": 2}) == tracking.params_hash({"b": 2, "a": 1})
