"""The small profile (``small/dvc.yaml``, ``small/params.yaml``) end to end on a cut, through
the real packaged models: SmolLM2-135M-Instruct (chat agent and System-1 base) and Gemma 3
270M (completion agent), each agent behind its own vLLM server, the System-1 solvers on
transformers with their adapters (the profile's engine: vLLM's CPU LoRA path measured 4x
slower), every program in the sandbox. Before this profile no real
pretrained model had gone through the stages together: real tokenizers, the chat template,
sampling, LoRA on real attention modules and the sandbox on real output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, git, make_project_copy

SMALL = "small"
EXPLORE = ROOT / "tests" / "fixtures" / "small_explore.jsonl"
TEST = ROOT / "tests" / "fixtures" / "small_test.jsonl"  # mini test string/1 and filter/2
CUT = {  # a few problems, a few training steps, one merge, one HumanEval problem
    "explore": {"concurrency": 12, "search": {"rollouts": 2, "max_programs": 3}},
    "disentangle": {"k_min": 2, "k_max": 2},
    "experts": {"epochs": 1, "max_length": 256, "check_per_cluster": 1, "max_new_tokens": 96,
                "merges": {"uniform": {"combination": "cat"}}},  # replaces the four
    # one epoch has no plateau to find, and 10 % of the cut's few problems holds none out
    # (with patience that is the error naming customize.patience)
    "customize": {"epochs": 1, "patience": None, "max_new_tokens": 96},
    "evaluate": {"per_group": 1, "seeds": [0], "ks": [1], "temperature": 0.0,
                 "max_new_tokens": 96, "system2": False},
    # SmolLM2 answers the filter problem with max(... range(1000000000) ...) from every
    # solver: 8 hidden tests x 3 s each, 8 times, was most of evaluate's 125 s (its
    # generation waited on the sandbox); the mini programs that pass take milliseconds
    "sandbox": {"timeout": 1.0},
}


def test_the_small_pipeline_is_generated_with_the_models_its_stages_load():
    """small/dvc.yaml is dvc.yaml's stages but pretrain; the stages that load a packaged
    model depend on the `models` settings too, so a changed model re-runs them."""
    from bdc.pipelines import stale

    assert stale(ROOT) == [], "run `bdc pipelines write` and commit small/dvc.yaml"
    mini = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    small = yaml.safe_load((ROOT / SMALL / "dvc.yaml").read_text())["stages"]
    assert list(small) == [s for s in mini if s != "pretrain"]
    for stage in ("explore", "experts", "customize", "evaluate"):
        assert small[stage]["params"] == [{"small/params.yaml": [*mini[stage]["params"],
                                                                  "models"]}]
    assert small["validate"]["params"] == [{"small/params.yaml": mini["validate"]["params"]}]


def cut_params(root: Path) -> None:
    params = yaml.safe_load((root / SMALL / "params.yaml").read_text())
    # four explore problems SmolLM2 solved in 2-4 of 4 samples at the profile's temperature
    # (a pool it can solve, so that the stages after explore get records on any CPU; on the
    # mini explore pool it solves ~5% of its samples)
    params["problems"]["explore"] = [{"name": "jsonl", "path": str(EXPLORE)}]
    params["problems"]["test"] = [{"name": "jsonl", "path": str(TEST)},
                                  {**params["problems"]["test"][1], "limit": 1}]
    params["vllm"]["python"] = str(ROOT / ".venv-vllm" / "bin" / "python")  # not copied
    for agent in params["explore"]["agents"].values():
        agent.update(thought_tokens=min(agent["thought_tokens"], 96), program_tokens=128)
    for stage, changes in CUT.items():
        for key, value in changes.items():
            if isinstance(value, dict) and key != "merges":
                params[stage][key].update(value)
            else:
                params[stage][key] = value
    (root / SMALL / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git("commit", "-qam", "cut", cwd=root)


@pytest.mark.small_profile  # ~4 min of the machine; in `make test`, alone: `make test-small`
@pytest.mark.timeout(1500)
def test_the_small_pipeline_runs_end_to_end_through_the_real_models(tmp_path, smollm2,
                                                                     gemma3):
    root = make_project_copy(tmp_path / "project")
    cut_params(root)
    for prepared in (smollm2, gemma3):  # converted once per test run
        for folder in (prepared / "var" / "models").iterdir():
            (root / "var" / "models").mkdir(parents=True, exist_ok=True)
            (root / "var" / "models" / folder.name).symlink_to(folder)
    env = {**os.environ, "BDC_PROJECT": str(root),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "HF_HOME"):
        env.pop(key, None)
    subprocess.run(["dvc", "init", "-q"], cwd=root, env=env, check=False)
    run = subprocess.run(["dvc", "repro", f"{SMALL}/dvc.yaml"], cwd=root, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    data = root / SMALL / "data"
    sft = [json.loads(line) for line in (data / "explore" / "sft.jsonl").read_text()
           .splitlines()]
    assert sft, "the real agents solved nothing"
    agents = {r["agent"] for r in sft} if "agent" in sft[0] else set()
    assert json.loads((data / "metrics" / "validate.json").read_text())["success"] is True
    table = json.loads((data / "eval" / "table.json").read_text())
    text = json.dumps(table)
    for solver in ("base", "full", "customized"):
        assert solver in text
    assert "humaneval" in text  # the transfer test is scored
    print(agents, run.stdout[-6000:], run.stderr[-6000:], sep="\n")  # stage times: pytest -s
