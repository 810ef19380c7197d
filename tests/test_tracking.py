"""The MLflow convention on a real SQLite store inside a throwaway project."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from bdc import tracking
from flows import runs


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
    with runs.pipeline_run("mini", root=store) as parent:
        monkeypatch.setenv(tracking.PARENT_ENV, parent)
        with tracking.stage_run("prepare", {}, "mini", root=store):
            pass
    (child,) = only_run(store, **{"bdc.stage": "prepare"})
    (pipe,) = only_run(store, **{"bdc.stage": "pipeline"})
    assert child.data.tags["mlflow.parentRunId"] == pipe.info.run_id == parent
    assert runs.find_stage_run("prepare", parent, 0, store).info.run_id == child.info.run_id
    assert runs.find_stage_run("prepare", "another-parent", 0, store) is None


def test_failed_pipeline_run_is_marked_failed(store):
    with pytest.raises(RuntimeError), runs.pipeline_run("mini", root=store):
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


def test_the_verdict_and_one_key_scheme():
    """The evaluate run's description promised the answer without holding it, and the
    pipeline run logged the same numbers under other keys (``full.strict_accuracy.mean``)
    with System-2 names mangled (``System-2_tree_planner_coder_``)."""
    from bdc.evaluate.claims import headline_metrics, verdict

    def row(mean):
        return {"strict_accuracy": {"mean": mean, "std": 1.0}, "pass_rate": {"mean": mean},
                "strict_interval": [mean - 5, mean + 5], "problems": 180, "seeds": 3}

    gap = {"solver": "customized", "difference": 4.0, "interval": [1.0, 7.0],
           "problems": 180, "verdict": "better"}
    table = {"solvers": {"full": row(10.0), "customized": row(14.0), "merge_uniform": row(8.0),
                         "arrow": row(9.0), "System-2: tree(planner+coder)": row(50.0),
                         "System-2: best-of-N(planner+coder)": row(30.0)},
             "claims": {"C_customized_vs_full": {**gap, "baseline": "full"},
                        "C_customized_vs_uniform": None,
                        "B_tree_vs_baselines": [{
                            "solver": "System-2: tree(planner+coder)", "difference": 20.0,
                            "baseline": "System-2: best-of-N(planner+coder)",
                            "interval": [12.0, 28.0], "verdict": "better"}]}}
    text = verdict(table)
    first, customize, boost = text.split("\n\n")[:3]
    assert first.startswith("**Best System-1 solver: customized**, 14.0 ± 1.0 %")
    assert "vs full-data LoRA +4.0 (95% CI +1.0 to +7.0: better)" in customize
    assert "vs uniform merge: not measured" in customize
    assert "best-of-N(planner+coder) +20.0" in boost
    metrics = headline_metrics(table)
    assert metrics["system2.tree.planner-coder.strict_accuracy"] == 50.0
    assert metrics["claim.C_customized_vs_full.ci_low"] == 1.0
    assert metrics["claim.B_tree_vs_best-of-N.planner-coder"] == 20.0
    assert all(tracking.metric_name(k) == k for k in metrics)  # keys MLflow keeps as they are


def test_metric_names_read_well_in_mlflow_charts():
    """Names with spaces or '/' (explore's `notes.1 of 2 replies had no code`, prepare's
    `by_difficulty.n/a`) made MLflow's chart view lead with sections of one useless chart."""
    assert tracking.metric_name("notes.1 of 2 replies had no code") == \
        "notes.1_of_2_replies_had_no_code"
    assert tracking.metric_name("by_difficulty.n/a") == "by_difficulty.n_a"
    assert tracking.metric_name("pass@1") == "pass_at_1"


def test_stage_runs_explain_themselves(store, tmp_path):
    """A stage run carries its stage's description and its data as an MLflow dataset input;
    tables are rounded for people (0.19999999999999996 showed as such)."""
    data = tmp_path / "sft.jsonl"
    data.write_text('{"problem_id": "a", "thoughts": ["x"], "n": 1}\n'
                    '{"problem_id": "b", "thoughts": [], "n": 2}\n')
    from bdc.stages import explore

    with tracking.stage_run("explore", {}, "mini", root=store, doc=explore.__doc__) as run:
        run.dataset(data, "SFT records", "training")
        run.table([{"rate": 0.1 + 0.1 + 0.1 - 0.1}], "t.json")
    (r,) = only_run(store, **{"bdc.stage": "explore"})
    assert r.data.tags["mlflow.note.content"].startswith("Stage ``explore`` (Boost)")
    (inp,) = mlflow.get_run(r.info.run_id).inputs.dataset_inputs
    assert inp.dataset.name == "SFT records" and inp.tags[0].value == "training"
    assert '"num_rows": 2' in inp.dataset.profile
    path = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="t.json")
    table = Path(path).read_text()
    assert "0.2]" in table and "0.20000000000000004" not in table


def test_up_to_date_stage_and_empty_pipeline_run_still_say_something(store, monkeypatch):
    """A Run press with every stage up to date showed only 'did not run' and left an empty
    parent run: the summary now shows the stage's current metrics and its last run, and the
    parent run holds the final table and says that nothing ran."""
    import json

    with tracking.stage_run("prepare", {}, "mini", root=store):
        pass
    (store / "data/metrics").mkdir(parents=True)
    (store / "data/metrics/prepare.json").write_text(json.dumps({"explore": {"problems": 60}}))
    (store / "data/eval").mkdir(parents=True)
    (store / "data/eval/table.md").write_text("| solver | strict |\n|---|---|\n| full | 9.4 |\n")
    (store / "data/eval/table.json").write_text(json.dumps(
        {"solvers": {"full": {"strict_accuracy": {"mean": 9.4, "std": 1.0},
                              "pass_rate": {"mean": 12.0, "std": 0.5},
                              "problems": 60, "seeds": 3}}, "order": ["full"]}))
    text = runs.run_summary_markdown("prepare", None, "http://ui:5000", store)
    (last,) = only_run(store, **{"bdc.stage": "prepare"})
    assert "Up to date" in text and "| explore.problems | 60 |" in text
    assert (f"#/experiments/{last.info.experiment_id}/runs/{last.info.run_id}"
            "?workflowType=machine_learning") in text  # MLflow's GenAI view is its default
    with runs.pipeline_run("mini", root=store):
        pass
    (pipe,) = only_run(store, **{"bdc.stage": "pipeline"})
    assert pipe.data.tags["bdc.stages_ran"] == "none"
    assert "Every stage was up to date" in pipe.data.tags["mlflow.note.content"]
    assert pipe.data.tags["mlflow.note.content"].startswith(
        "**Best System-1 solver: full**, 9.4 ± 1.0 %")
    assert pipe.data.metrics == {"full.strict_accuracy": 9.4, "full.strict_accuracy_std": 1.0,
                                 "full.pass_rate": 12.0}
    assert mlflow.get_experiment(pipe.info.experiment_id).tags[
        "mlflow.experimentKind"] == "custom_model_development"  # not MLflow's GenAI view
    assert tracking.runs_view_url("http://ui:5000/", "7") == \
        "http://ui:5000/#/experiments/7/runs?workflowType=machine_learning"


KILLED_STAGE = """
import sys, time
from pathlib import Path
from bdc import tracking
with tracking.stage_run("explore", {}, "mini", root=Path(sys.argv[1])):
    print("started", flush=True)
    time.sleep(600)
"""


def test_a_killed_stage_s_run_is_marked_killed_by_the_next_run(store):
    """Issue 26.8: the MLflow run of a stage killed with -9 stayed RUNNING forever. The next
    run on the machine ends it as KILLED (its process is gone); a run whose process lives
    is left alone."""
    import subprocess
    import sys

    def start(stage: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_STAGE.replace("explore", stage),
                                 str(store)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "started"
        return proc

    killed, living = start("explore"), start("validate")
    try:
        killed.kill()
        killed.wait()
        (dead,) = only_run(store, **{"bdc.stage": "explore"})
        assert dead.info.status == "RUNNING"  # what MLflow keeps by itself
        with tracking.stage_run("disentangle", {}, "mini", root=store):
            pass
        assert mlflow.get_run(dead.info.run_id).info.status == "KILLED"
        assert "gone" in mlflow.get_run(dead.info.run_id).data.tags["bdc.ended"]
        (alive,) = only_run(store, **{"bdc.stage": "validate"})
        assert alive.info.status == "RUNNING"
    finally:
        living.kill()
        living.wait()


def test_a_truncated_store_is_one_error_naming_the_file(store):
    """Issue 26.8: a truncated MLflow database gave SQLAlchemy's traceback, no path."""
    import subprocess
    import sys

    setup = "import sys; from pathlib import Path; from bdc import tracking; " \
            "tracking.setup(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", setup, str(store)], check=True, timeout=120,
                   capture_output=True)
    db = store / "var/mlflow/mlflow.db"
    db.write_bytes(db.read_bytes()[:20000])
    done = subprocess.run([sys.executable, "-c", setup, str(store)], capture_output=True,
                          text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bdc.tracking.StoreUnreadable: {db}: the MLflow store cannot be "
                           "read"), done.stderr[-2000:]


def test_a_run_is_dirty_for_changed_code_not_for_the_pipelines_own_outputs(tmp_path):
    """Every run from a fresh clone's ``make run`` was tagged ``-dirty``: the pipeline
    rewrites its git-tracked metrics, plots and dvc.lock. Changed code still is dirty."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    for path in ("data/metrics/evaluate.json", "small/data/plots/a.csv", "dvc.lock",
                 "small/dvc.lock", "bdc/x.py", "params.yaml"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "x")
    for path in ("data/metrics/evaluate.json", "small/data/plots/a.csv", "dvc.lock",
                 "small/dvc.lock"):
        (tmp_path / path).write_text("2\n")
    assert not tracking.git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "params.yaml").write_text("2\n")
    assert tracking.git_commit(tmp_path).endswith("-dirty")


def test_the_report_link_opens_in_mlflow_not_as_a_download(store):
    """validate's artifact linked MLflow's get-artifact route, which sends the HTML as a
    file to save: the link is the run's artifact view, and the site's own file is named."""
    with tracking.stage_run("validate", {}, "mini", root=store) as run:
        run.tag("bdc.report", "docs/index.html")
        run.tag("bdc.report_file", "/p/data/validate/docs/index.html")
    (r,) = only_run(store, **{"bdc.stage": "validate"})
    text = runs.run_summary_markdown("validate", r, "http://ui:5000", store)
    assert (f"/runs/{r.info.run_id}/artifacts/docs/index.html?workflowType=machine_learning) "
            "(in MLflow)") in text
    assert "get-artifact" not in text and "`/p/data/validate/docs/index.html`" in text


def test_a_table_without_a_verdict_still_ends_the_pipeline_run_described(store):
    """A table.json the verdict cannot read (another version's) left the pipeline run
    without a description or ``bdc.stages_ran``: the table's text stands in."""
    (store / "data/eval").mkdir(parents=True)
    (store / "data/eval/table.md").write_text("| solver | strict |\n|---|---|\n| full | 9.4 |\n")
    (store / "data/eval/table.json").write_text('{"rows": []}')
    with runs.pipeline_run("mini", root=store):
        pass
    (pipe,) = only_run(store, **{"bdc.stage": "pipeline"})
    assert "| full | 9.4 |" in pipe.data.tags["mlflow.note.content"]
    assert pipe.data.tags["bdc.stages_ran"] == "none"
