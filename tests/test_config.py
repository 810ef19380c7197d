from __future__ import annotations

from pathlib import Path

import pytest

from bdc.config import ConfigError, Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.profile == "mini" and params.sandbox.workers >= 1


def test_defaults_match_params_yaml():
    """params.yaml states every default explicitly; the schema must agree with it. The
    exceptions are the method's recipes, ``explore``, ``experts``, ``customize`` and
    ``evaluate`` (the schema holds the paper code's defaults: API agents, 16 rollouts, r 8 on
    q/v, Adam at 1e-5, greedy decoding ...; params.yaml the mini profile's tiny models and
    budgets), ``explore_compare`` (its teams name those mini agents) and ``models`` (the
    packaged real models: data, not a default)."""
    params = load_params(ROOT / "params.yaml")
    paper_defaults = ("explore", "explore_compare", "experts", "customize", "evaluate",
                      "models")
    assert params.model_copy(update={k: getattr(Params(), k) for k in paper_defaults}) \
        == Params()
    paper = Params().explore.search
    assert (paper.c_base, paper.c, paper.width, paper.trials, paper.rollouts, paper.gamma) == \
        (10, 4, 3, 2, 16, 0.9)
    assert all(a.temperature == 0 and a.program_tokens == 1024
               for a in Params().explore.agents.values())


def test_paper_profile_holds_the_paper_settings():
    """paper/params.yaml: real benchmarks, the paper's test slices, API agents, and the
    schema's (the paper code's) exploration settings, every one stated."""
    paper = load_params(ROOT / "paper" / "params.yaml")
    assert paper.profile == "paper" and paper.explore == Params().explore
    assert not paper.problems.pretrain and paper.sandbox.strict
    explore = {(s.name, s.split) for s in paper.problems.explore}
    assert explore == {("apps", "train"), ("codecontests", "train")}
    slices = {(s.name, s.split or "test", s.slice) for s in paper.problems.test}
    assert {("apps", "test", "interview"), ("apps", "test", "competition"),
            ("apps", "test", "introductory"), ("codecontests", "test", "easy"),
            ("codecontests", "valid", "hard")} <= slices
    assert {"humaneval", "mbpp"} <= {s.name for s in paper.problems.test}


@pytest.mark.parametrize("text, message", [
    ("sandbox:\n  timeot: 3\n", "sandbox.timeot: Extra inputs are not permitted"),
    ("sandbox:\n  timeout: fast\n", "sandbox.timeout: Input should be a valid number"),
    ("problems:\n  explore:\n    - {name: apps, limt: 3}\n", "problems.explore[0].limt"),
    ("problems:\n  explore:\n    - {name: nope}\n", "problems.explore[0].name"),
    ("profile: huge\n", "profile: Input should be 'mini', 'small' or 'paper'"),
    # issue 26.8: pass@5 of three samples was silently left out of the table
    ("evaluate:\n  seeds: [0, 1, 2]\n  ks: [1, 5]\n",
     "evaluate: Value error, ks [1, 5]: pass@k needs 1 <= k <= the samples per problem"),
])
def test_bad_params_name_the_key(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nsandbox: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: invalid YAML"):
        load_params(path)
