"""The `bdc` command as users run it: subprocesses, real files, real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BDC = str(Path(sys.executable).parent / "bdc")
COMMANDS = [[], ["problems"], ["problems", "export"], ["evaluate"], ["tiny-model"],
            ["sandbox-info"], ["prepare"], ["models"], ["models", "prepare"]]


def bdc(*args, cwd=None, check=True, timeout=300):
    proc = subprocess.run([BDC, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"bdc {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "bdc")
def test_help_on_every_command(command):
    out = bdc(*command, "--help").stdout
    assert "Usage:" in out


def test_python_dash_m_runs_the_same_cli():
    proc = subprocess.run([sys.executable, "-m", "bdc", "sandbox-info", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Usage:" in proc.stdout


@pytest.mark.slow
def test_export_and_evaluate_canonical_humaneval(tmp_path):
    out = bdc("problems", "export", "humaneval", "--out", "he.jsonl", "--references",
              "canonical.jsonl", cwd=tmp_path)
    assert "wrote 164 problems" in out.stderr
    proc = bdc("score", "--problems", "he.jsonl", "--samples", "canonical.jsonl",
               "--out", "results.jsonl", "--split", "all", "--workers", "2", cwd=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").open()]
    assert len(rows) == 164 and all(r["status"] == "passed" for r in rows)
    assert {"problem_id", "sample_index", "status", "passed", "total", "pass_rate"} <= set(rows[0])
    assert "strict_accuracy" in proc.stdout and "1.0000" in proc.stdout
    # the command's old name works for one release, saying so; the stage keeps its own
    old = bdc("evaluate", "--problems", "he.jsonl", "--samples", "canonical.jsonl",
              "--out", "old.jsonl", "--split", "all", "--workers", "2", cwd=tmp_path)
    assert "deprecated" in old.stdout + old.stderr
    assert (tmp_path / "old.jsonl").read_text() == (tmp_path / "results.jsonl").read_text()


def test_evaluate_several_samples_reports_pass_at_k(tmp_path):
    bdc("problems", "export", "humaneval", "--out", "he.jsonl", "--limit", "3", cwd=tmp_path)
    ids = [json.loads(line)["id"] for line in (tmp_path / "he.jsonl").open()]
    with (tmp_path / "s.jsonl").open("w") as f:
        for pid in ids:
            for body in ("    return None\n", "    pass\n", "    return 1\n"):
                f.write(json.dumps({"problem_id": pid, "completion": body}) + "\n")
    proc = bdc("score", "--problems", "he.jsonl", "--samples", "s.jsonl", "--out",
               "r.jsonl", "--timeout", "2", cwd=tmp_path)
    assert "pass@1" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").open()]
    assert [r["sample_index"] for r in rows[:3]] == [0, 1, 2]


def test_bad_input_exits_2_naming_file_and_line(tmp_path):
    bdc("problems", "export", "humaneval", "--out", "he.jsonl", "--limit", "2", cwd=tmp_path)
    (tmp_path / "s.jsonl").write_text('{"problem_id": "HumanEval/0", "program": "x"}\n{oops\n')
    proc = bdc("score", "--problems", "he.jsonl", "--samples", "s.jsonl", "--out", "r.jsonl",
               cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "s.jsonl:2: invalid JSON" in proc.stderr
    assert not (tmp_path / "r.jsonl").exists()  # no half-written output
    (tmp_path / "s.jsonl").write_text('{"problem_id": "nope", "program": "x"}\n')
    proc = bdc("score", "--problems", "he.jsonl", "--samples", "s.jsonl", "--out", "r.jsonl",
               cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown problems" in proc.stderr
    (tmp_path / "params.yaml").write_text("sandbox:\n  workerz: 3\n")
    proc = bdc("score", "--problems", "he.jsonl", "--samples", "s.jsonl", "--out", "r.jsonl",
               cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "sandbox.workerz" in proc.stderr


def test_export_native_source(tmp_path):
    fixtures = Path(__file__).parent / "fixtures"
    bdc("problems", "export", "codecontests", "--path", str(fixtures / "code_contests.jsonl"),
        "--slice", "easy", "--out", "cc.jsonl", cwd=tmp_path)
    (row,) = [json.loads(line) for line in (tmp_path / "cc.jsonl").open()]
    assert row["kind"] == "stdio" and row["meta"]["band"] == "easy"
    proc = bdc("problems", "export", "apps", "--path", str(tmp_path / "missing"),
               "--out", "a.jsonl", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "missing: no such file or folder" in proc.stderr


def test_runtime_state_stays_in_the_project(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    bdc("sandbox-info", cwd=tmp_path)
    assert (tmp_path / "var" / "tmp").is_dir() and (tmp_path / "var" / "mlflow").is_dir()
    leftovers = list((tmp_path / "var" / "tmp").iterdir())
    assert leftovers == []  # the sandbox cleaned its scratch


def test_offline_and_telemetry_switches_are_set():
    code = ("from bdc.runtime import configure_environment\nimport os, json\n"
            "configure_environment()\nprint(json.dumps(dict(os.environ)))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "MLFLOW_DISABLE_TELEMETRY", "DVC_NO_ANALYTICS",
                        "PYDANTIC_DISABLE_PLUGINS")}
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                    text=True, check=True).stdout)
    assert out["HF_HUB_OFFLINE"] == "1" and out["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert out["DVC_NO_ANALYTICS"] == "1" and out["GX_ANALYTICS_ENABLED"] == "false"
    assert out["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert out["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # not a terminal: no download/load bars
    assert out["PYDANTIC_DISABLE_PLUGINS"] == "__all__"  # no scan of every distribution


def test_a_missing_params_file_is_an_error_naming_it(tmp_path):
    """Bug: a mistyped --params silently ran with the built-in defaults."""
    missing = tmp_path / "nope.yaml"
    proc = bdc("sandbox-info", "--params", str(missing), check=False)
    assert proc.returncode == 2 and f"{missing}: file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


BUG = """
import sys
from bdc import _cli as cli

@cli.app.command("crash")
def crash():
    {}["a key that is not there"]

sys.argv = ["bdc", "crash"]
cli.main()
"""


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(tmp_path):
    """Bug: every KeyError and ValueError was printed as a one-line 'error' with exit 2."""
    proc = subprocess.run([sys.executable, "-c", BUG], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError" in proc.stderr
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "a"}\n')
    proc = bdc("score", "--problems", str(bad), "--samples", str(bad), "--out",
               str(tmp_path / "r.jsonl"), check=False)
    assert proc.returncode == 2 and f"{bad}:1:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hf_hub_offline_0_lets_datasets_and_transformers_download_too():
    """Bug: `HF_HUB_OFFLINE=0` (the README's switch for a machine that reaches the hub)
    left HF_DATASETS_OFFLINE=1 set, and datasets lets that win: the paper pipeline's
    prepare could not download APPS, CodeContests or MBPP."""
    code = ("from bdc.runtime import configure_environment\nimport os, json\n"
            "configure_environment()\nprint(json.dumps(dict(os.environ)))")
    env = {k: v for k, v in os.environ.items() if "OFFLINE" not in k}
    out = json.loads(subprocess.run([sys.executable, "-c", code],
                                    env={**env, "HF_HUB_OFFLINE": "0"}, capture_output=True,
                                    text=True, check=True).stdout)
    assert (out["HF_HUB_OFFLINE"], out["HF_DATASETS_OFFLINE"],
            out["TRANSFORMERS_OFFLINE"]) == ("0", "0", "0")


def test_the_project_root_from_inside_a_pipeline_folder(tmp_path):
    """paper/ holds a params.yaml of its own: from inside it, state (var/, MLflow) must still
    be the project's, not a second store under paper/."""
    from bdc.runtime import project_root

    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "params.yaml").write_text("profile: paper\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "params.yaml").write_text("seed: 0\n")
    env = os.environ.pop("BDC_PROJECT", None)
    try:
        assert project_root(tmp_path / "paper") == tmp_path.resolve()
        assert project_root(tmp_path / "other") == (tmp_path / "other").resolve()
    finally:
        if env is not None:
            os.environ["BDC_PROJECT"] = env


def test_an_unwritable_output_fails_the_stage_before_it_rewrites_anything(tmp_path):
    """Issue 26.8: experts failed on a read-only data/plots only after rewriting its metrics
    and adapters (which then looked fresh), with a traceback naming no path. A folder a
    stage cannot write (here: under a file, which not even root can write into) fails it
    first, in one line naming the folder."""
    (tmp_path / "not-a-folder").write_text("")
    metrics = tmp_path / "metrics/prepare.json"
    metrics.parent.mkdir()
    metrics.write_text('{"from": "the last run"}')
    proc = bdc("prepare", "--out-dir", str(tmp_path / "problems"), "--metrics", str(metrics),
               "--plots", str(tmp_path / "not-a-folder/plots/prepare.csv"), cwd=tmp_path,
               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{tmp_path / 'not-a-folder/plots'}: cannot write it" in proc.stderr, proc.stderr
    assert metrics.read_text() == '{"from": "the last run"}'
    assert not list((tmp_path / "problems").glob("*.jsonl"))


FULL_DISK = """
import resource, signal, sys
from bdc.jsonl import write_jsonl
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
write_jsonl(sys.argv[1], [{"program": "x" * 100}] * 1000)
"""


def test_a_full_disk_names_the_output_and_leaves_no_partial_file(tmp_path):
    """Issue 26.8: a full disk gave a traceback without a path. Writes past a file-size limit
    fail as writes on a full disk do (no file name in the OS error)."""
    out = tmp_path / "samples.jsonl"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(out)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert f"OutputError: {out}: cannot write it: File too large" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_models_prepare_refuses_a_model_params_does_not_name(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    proc = bdc("models", "prepare", "gpt-5", "--params", str(tmp_path / "params.yaml"),
               check=False)
    assert proc.returncode == 2 and "models ['gpt-5']: not in params.yaml models:" in \
        proc.stderr, proc.stderr


def test_help_is_reflowed_with_its_code_rendered():
    """Issue 29: `bdc --help` showed RST markup literally (``--engine vllm``) and kept the
    docstrings' hard line breaks."""
    out = subprocess.run([BDC, "serve", "--help"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "COLUMNS": "300"}).stdout
    assert "``" not in out
    # one paragraph, one line at this width (the docstring has five)
    assert "(Ctrl-C or SIGTERM). With --engine vllm the server is vLLM's own, started and " \
        "waited for; stopping this command" in out


def test_results_prints_the_table_and_one_line_per_claim(tmp_path):
    """Issue 29: the results were a 2,576-column `dvc exp show` away; `bdc results` prints
    the profile's table and claims within 120 columns, and names the command that makes
    them when there are none."""
    from bdc.evaluate.claims import claims
    from bdc.evaluate.table import paired

    base = {f"p{i}": float(10 * (i % 5)) for i in range(12)}
    full = {p: v + 10 for p, v in base.items()}
    row = {"pass_rate": {"mean": 30.0, "std": 1.0}, "strict_interval": [2.0, 20.0]}
    solvers = {"base": {**row, "strict_accuracy": {"mean": 20.0, "std": 1.5}},
               "full": {**row, "strict_accuracy": {"mean": 30.0, "std": 0.5}},
               "customized": {**row, "strict_accuracy": {"mean": 25.0, "std": 2.0}}}
    measured = claims(solvers, [], {}, {"base": base, "full": full, "customized": full})
    assert paired(full, base)["verdict"] == "better"
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "data" / "eval").mkdir(parents=True)
    (tmp_path / "data" / "eval" / "table.json").write_text(json.dumps(
        {"solvers": solvers, "claims": measured, "order": ["base", "full", "customized"]}))
    env = {**os.environ, "BDC_PROJECT": str(tmp_path), "COLUMNS": "120"}
    out = subprocess.run([BDC, "results"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "full" in out.stdout and "30.0 ± 0.5" in out.stdout and "2.0 to 20.0" in out.stdout
    assert "best System-1 solver: full (30.0 ± 0.5)" in out.stdout
    assert "- C: customized vs full: -5.0 points" in " ".join(out.stdout.split())
    assert max(len(line) for line in out.stdout.splitlines()) <= 120
    missing = subprocess.run([BDC, "results", "--profile", "small"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert missing.returncode != 0 and "make run PROFILE=small" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_an_unknown_registered_solver_is_one_line_not_a_traceback(tmp_path):
    """Issue 29: `bdc solve --model-uri models:/bdc-solver/9` (no such version) printed a
    72-line traceback."""
    (tmp_path / "params.yaml").write_text("{}\n")
    env = {**os.environ, "BDC_PROJECT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([BDC, "solve", "--text", "x", "--model-uri",
                          "models:/bdc-solver/999"], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--model-uri models:/bdc-solver/999:" in out.stderr
