"""The DVC pipeline in a throwaway git repo, with real `dvc` and real stage commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import git

pytestmark = pytest.mark.slow

SLOW_WRITER = '''
import os, sys, time
from bdc.jsonl import atomic_open
with atomic_open("data/slow.txt") as f:
    for i in range(50):
        f.write(f"line {i}\\n")
        f.flush()
        if not os.environ.get("FAST"):
            time.sleep(0.2)
'''


def dvc(*args: str, cwd: Path, env: dict | None = None, check: bool = True):
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)}: {proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


@pytest.fixture
def pipeline(project: Path) -> Path:
    """The project's pipeline plus a stage (`check`, the test pool's reference solutions in
    the sandbox) that reads other params, and a slow one to kill."""
    from bdc.problems import mini
    from bdc.problems.format import Sample
    from tests.conftest import SMALL

    refs = [Sample(problem_id=p.id, program=p.meta["reference"]["program"])
            for p in mini.load(slice="test", limit=SMALL["test"], seed=0).problems]
    (project / "refs.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in refs))
    (project / "slow_writer.py").write_text(SLOW_WRITER)
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    spec["stages"]["check"] = {
        "cmd": "bdc score --problems data/problems/test.jsonl --samples refs.jsonl "
               "--out data/check.jsonl --timeout ${sandbox.timeout}",
        "deps": ["data/problems/test.jsonl", "refs.jsonl"], "params": ["sandbox"],
        "outs": ["data/check.jsonl"]}
    spec["stages"]["slow"] = {"cmd": "python slow_writer.py", "deps": ["slow_writer.py"],
                              "outs": ["data/slow.txt"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    git("add", "-A", cwd=project)
    git("commit", "-qm", "pipeline with a check stage", cwd=project)
    return project


def a_teammates_fresh_clone_pulls_the_results(pipeline: Path, tmp_path: Path) -> None:
    """The DVC remote story: outputs pushed to a (here local) remote; a fresh clone of the
    repository gets them with `dvc pull`, up to date, without running a stage."""
    remote = tmp_path / "remote"
    dvc("remote", "add", "-d", "team", str(remote), cwd=pipeline)
    git("add", "-A", cwd=pipeline)
    git("commit", "-qm", "results and the team remote", cwd=pipeline)
    assert "pushed" in dvc("push", cwd=pipeline)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(pipeline), str(clone)], check=True)
    assert not (clone / "data/problems/test.jsonl").exists()
    dvc("pull", "--with-deps", "check", cwd=clone)  # the stage and what it depends on
    for name in ("problems/explore.jsonl", "problems/test.jsonl", "check.jsonl"):
        assert (clone / "data" / name).read_bytes() == (pipeline / "data" / name).read_bytes()
    assert "up to date" in dvc("status", "check", cwd=clone)
    assert "Running stage" not in dvc("repro", "check", cwd=clone)


def test_repro_noop_and_param_change(pipeline, tmp_path):
    out = dvc("repro", "check", cwd=pipeline)
    assert "Running stage 'prepare'" in out and "Running stage 'check'" in out
    rows = [json.loads(line) for line in (pipeline / "data/check.jsonl").open()]
    assert len(rows) == 60 and all(r["status"] == "passed" for r in rows)
    assert json.loads((pipeline / "data/metrics/prepare.json").read_text())["test"]["problems"] \
        == 60
    # `dvc metrics show` was one table ~4,000 characters wide: headline numbers only now,
    # every number in data/metrics/details/ (kept by DVC, not shown)
    shown = dvc("metrics", "show", cwd=pipeline)
    assert max(map(len, shown.splitlines())) < 120, shown
    details = json.loads((pipeline / "data/metrics/details/prepare.json").read_text())
    assert sum(details["test"]["by_family"].values()) == 60
    lock = (pipeline / "dvc.lock").read_text()

    start = time.monotonic()
    out = dvc("repro", "check", cwd=pipeline)
    noop_s = time.monotonic() - start
    assert "Running stage" not in out and (pipeline / "dvc.lock").read_text() == lock
    print(f"no-op dvc repro: {noop_s:.2f}s")
    a_teammates_fresh_clone_pulls_the_results(pipeline, tmp_path)

    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["sandbox"]["timeout"] = 4.0
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepared = {f: (pipeline / "data/problems" / f).read_bytes() for f in ("test.jsonl",)}
    out = dvc("repro", "check", cwd=pipeline)
    # the stage that reads the key re-runs; prepare re-checks the whole file (seconds) and,
    # its outputs unchanged, makes nothing after it re-run
    assert "Running stage 'check'" in out and "Running stage 'prepare'" in out
    assert {f: (pipeline / "data/problems" / f).read_bytes() for f in prepared} == prepared

    params["problems"]["test"][0]["limit"] = 5
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc("repro", "prepare", cwd=pipeline)
    assert "Running stage 'prepare'" in out
    assert json.loads((pipeline / "data/metrics/prepare.json").read_text())["test"]["problems"] \
        == 30


def test_exp_run_sets_params(pipeline):
    dvc("repro", "prepare", cwd=pipeline)
    git("add", "-A", cwd=pipeline)
    git("commit", "-qm", "baseline", cwd=pipeline)
    out = dvc("exp", "run", "prepare", "-S", "problems.split.min_tests=3", cwd=pipeline)
    assert "Running stage 'prepare'" in out
    exps = json.loads(dvc("exp", "show", "--json", cwd=pipeline))
    text = json.dumps(exps)
    assert '"min_tests": 3' in text and '"min_tests": 2' in text  # experiment and baseline
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    assert params["problems"]["split"]["min_tests"] == 3  # applied to the workspace


def test_bad_params_fail_the_stage_with_the_key(pipeline):
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["problems"]["explore"][0]["slise"] = "explore"
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc("repro", "prepare", cwd=pipeline, check=False)
    assert "problems.explore[0].slise" in out
    assert not (pipeline / "data/problems/explore.jsonl").exists()


def test_a_misspelled_top_level_key_stops_dvc_repro_naming_it(pipeline):
    """Bug: `experst: {epochs: 20}` in params.yaml was silent under `dvc repro` ("Data and
    pipelines are up to date", exit 0: DVC tracks only the keys each stage reads), and the
    user believed the setting took effect."""
    dvc("repro", "prepare", cwd=pipeline)
    text = (pipeline / "params.yaml").read_text()
    (pipeline / "params.yaml").write_text(text + "experst: {epochs: 20}\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "prepare"],
                          cwd=pipeline, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "experst" in proc.stdout + proc.stderr
    assert "up to date" not in proc.stdout


def test_killed_stage_leaves_no_valid_looking_output(pipeline):
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro", "slow"],
                            cwd=pipeline, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    data = pipeline / "data"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if data.exists() and any(p.name.startswith(".slow.txt.") for p in data.iterdir()):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the slow stage never started writing")
    time.sleep(0.5)  # mid-write
    # a second `dvc repro` meanwhile is refused, with DVC's words the docs quote
    second = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "slow"],
                            cwd=pipeline, capture_output=True, text=True, timeout=120)
    refused = second.stdout + second.stderr
    assert second.returncode != 0 and ("is busy, it is being blocked by" in refused or
                                       "Unable to acquire lock" in refused), refused
    print(refused)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (data / "slow.txt").exists()  # the partial file never took the real name
    status = dvc("status", "slow", cwd=pipeline)
    assert "slow" in status and "up to date" not in status.lower()
    dvc("repro", "slow", cwd=pipeline, env={"FAST": "1"})
    assert len((data / "slow.txt").read_text().splitlines()) == 50
