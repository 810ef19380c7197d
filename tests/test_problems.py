"""The problem format, the split protocol and every source reader, on native-format fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bdc.config import SandboxSettings
from bdc.jsonl import RecordError
from bdc.problems import apps, codecontests
from bdc.problems.format import (
    CallTest,
    CodeTest,
    Problem,
    PublicView,
    StdioTest,
    read_problems,
    split_tests,
    write_problems,
)
from bdc.problems.humaneval import split_check
from bdc.problems.sources import SourceError, load_source
from bdc.sandbox import Sandbox
from bdc.sandbox.scoring import score_samples

FIXTURES = Path(__file__).parent / "fixtures"


def good_problem(**over) -> dict:
    row = {"id": "p1", "source": "hand", "prompt": "add", "kind": "function",
           "entry_point": "add", "tests": {"public": [{"input": [1, 2], "output": 3}],
                                           "hidden": [{"code": "assert add(2, 2) == 4"}]},
           "meta": {}}
    row.update(over)
    return row


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------ format

def test_round_trip(tmp_path):
    p = Problem.model_validate(good_problem())
    write_problems(tmp_path / "p.jsonl", [p])
    assert read_problems(tmp_path / "p.jsonl") == [p]
    assert isinstance(p.tests.public[0], CallTest) and isinstance(p.tests.hidden[0], CodeTest)


@pytest.mark.parametrize("bad, message", [
    ('{"id": "p2", "source": ', "invalid JSON"),
    (json.dumps({k: v for k, v in good_problem(id="p2").items() if k != "prompt"}),
     ": prompt: Field required"),
    (json.dumps(good_problem(id="p2", tests={"public": [{"input": 5, "output": 1}]})),
     ": tests.public[0]"),
    (json.dumps(good_problem(id="p2", tests={"public": [{"inp": [1], "output": 1}]})),
     ": tests.public[0]"),
    (json.dumps(good_problem(id="p2", kind="stdio")), "stdio problem takes only"),
    (json.dumps(good_problem(id="p2", entry_point=None)), "needs an entry_point"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_input_names_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", [good_problem(), bad])
    with pytest.raises(RecordError) as info:
        read_problems(path)
    assert str(info.value).startswith(f"{path}:2:") and message in str(info.value)


def test_test_shapes_are_chosen_by_shape():
    p = Problem.model_validate(good_problem(
        kind="stdio", entry_point=None,
        tests={"public": [{"input": "1\n", "output": "2\n"}], "hidden": []}))
    assert isinstance(p.tests.public[0], StdioTest)


def test_public_view_has_no_hidden_tests():
    view = Problem.model_validate(good_problem()).public_view()
    assert isinstance(view, PublicView)
    assert "hidden" not in view.model_dump_json() and not hasattr(view, "tests")
    assert view.public_tests and set(PublicView.model_fields) >= {"public_tests"}


def test_split_protocol():
    tests = [CallTest(input=[i], output=i) for i in range(5)]
    split = split_tests(tests, min_tests=2)
    assert split.public == tests[:2] and split.hidden == tests[2:]
    assert split_tests(tests[:1], min_tests=2) is None
    assert split_tests(tests[:1], min_tests=1).hidden == tests[:1]
    assert split_tests(tests, 2) == split_tests(list(tests), 2)  # deterministic


# --------------------------------------------------------------------------------- humaneval

def test_humaneval_export(humaneval_data):
    data = humaneval_data
    assert len(data.problems) == 164 and len(data.references) == 164
    assert all(p.kind == "function" and p.entry_point for p in data.problems)
    kinds = [type(t) for p in data.problems for t in p.tests_for("all")]
    assert kinds.count(CallTest) > 900 and CodeTest in kinds
    assert len(load_source("humaneval", min_tests=2).problems) < 164


def test_humaneval_check_splitting_is_faithful():
    test_src = '''
METADATA = {}

def check(candidate):
    assert candidate([1, 2]) == 3
    assert candidate([]) == 0, "empty"
    assert True, "placeholder"
    assert candidate((1, 2)) == 3
    assert abs(candidate([0.5]) - 0.5) < 1e-6
    x = [4]
    assert candidate(x) == 4
'''
    tests = split_check(test_src, "f")
    assert tests[0] == CallTest(input=[[1, 2]], output=3)
    assert tests[1] == CallTest(input=[[]], output=0)
    # tuples, tolerances and setup-dependent asserts stay snippets (with their setup lines)
    assert isinstance(tests[2], CodeTest) and "(1, 2)" in tests[2].code
    assert isinstance(tests[3], CodeTest) and "abs(" in tests[3].code
    assert isinstance(tests[4], CodeTest) and tests[4].code.splitlines()[-2] == "x = [4]"
    assert len(tests) == 5  # the `assert True` placeholder tests nothing


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass(humaneval_data):
    problems = {p.id: p for p in humaneval_data.problems}
    with Sandbox(SandboxSettings(workers=2)) as sandbox:
        scores = list(score_samples(problems, humaneval_data.references, sandbox, "all"))
    failed = [(s.problem_id, s.detail) for s in scores if s.status != "passed"]
    assert not failed and len(scores) == 164


def test_humaneval_wrong_solution_fails(humaneval_data):
    problems = {p.id: p for p in humaneval_data.problems}
    from bdc.problems.format import Sample

    wrong = [Sample(problem_id=pid, completion="    return None\n") for pid in list(problems)[:8]]
    with Sandbox(SandboxSettings(workers=1)) as sandbox:
        scores = list(score_samples(problems, wrong, sandbox, "all"))
    assert all(s.status != "passed" for s in scores)


# ------------------------------------------------------------------------------------ APPS

def test_apps_release_folder_with_and_without_fn_name():
    data = apps.load(path=str(FIXTURES / "apps" / "test"), slice="all")
    by_id = {p.id: p for p in data.problems}
    stdio, call = by_id["apps/test/0"], by_id["apps/test/1"]
    assert stdio.kind == "stdio" and stdio.entry_point is None
    assert stdio.tests.public == [StdioTest(input="1 2\n", output="3\n"),
                                  StdioTest(input="3 4\n", output="7\n")]
    assert len(stdio.tests.hidden) == 2
    assert call.kind == "function" and call.entry_point == "squares"
    assert call.tests.public[0] == CallTest(input=[[1, 2]], output=[1, 4])  # APPS wrapping undone
    assert "Starter code" in call.prompt and call.meta["difficulty"] == "interview"
    assert "apps/test/2" not in by_id and data.dropped == 1  # one test: dropped
    assert by_id["apps/test/3000"].tests.hidden[0].output == "7"  # list-of-lines output


def test_apps_slices():
    assert apps.parse_slice("interview") == (0, 99)
    assert apps.parse_slice("competition") == (3000, 3099)
    assert apps.parse_slice("introductory") == (4000, 4099)
    data = apps.load(path=str(FIXTURES / "apps" / "test"), slice="competition")
    assert [p.id for p in data.problems] == ["apps/test/3000"]
    with pytest.raises(SourceError, match="APPS slice 'hard'"):
        apps.parse_slice("hard")


def test_apps_hugging_face_rows():
    data = apps.load(path=str(FIXTURES / "apps_rows.jsonl"), slice="introductory")
    (p,) = data.problems
    assert p.entry_point == "add" and p.tests.hidden == [CallTest(input=[5, 5], output=10)]


def test_apps_references_pass_in_the_sandbox():
    data = apps.load(path=str(FIXTURES / "apps" / "test"), slice="all", min_tests=1)
    problems = {p.id: p for p in data.problems}
    with Sandbox(SandboxSettings(workers=1)) as sandbox:
        scores = list(score_samples(problems, data.references, sandbox, "all"))
    assert [s.status for s in scores] == ["passed"] * len(problems)


# ------------------------------------------------------------------------------ CodeContests

def test_codecontests_tests_and_bands():
    path = str(FIXTURES / "code_contests.jsonl")
    data = codecontests.load(path=path, slice="all")
    by_name = {p.id.rsplit("/", 1)[1]: p for p in data.problems}
    easy = by_name["1A_easy"]
    # public + private + generated, in that order, then split in half
    assert [t.input for t in easy.tests_for("all")] == ["1\n", "2\n", "5\n", "0\n"]
    assert len(easy.tests.public) == 2 and easy.meta["band"] == "easy"
    assert by_name["1B_hard"].meta["band"] == "hard"
    assert "1C_single" not in by_name and data.dropped == 1
    assert [p.id for p in codecontests.load(path=path, slice="easy").problems] == [easy.id]
    assert [p.meta["difficulty"] for p in codecontests.load(path=path, slice="hard").problems] \
        == [13]
    assert len(data.references) == 2 and "print(2 *" in data.references[0].program


def test_codecontests_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "code_contests.jsonl").open()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cc.parquet")
    data = codecontests.load(path=str(tmp_path / "cc.parquet"), slice="all")
    assert len(data.problems) == 2


def test_codecontests_malformed_row_names_line(tmp_path):
    path = write_lines(tmp_path / "cc.jsonl", [{"name": "x"}])
    with pytest.raises(SourceError, match=r"cc.jsonl:1: missing field 'description'"):
        codecontests.load(path=str(path))


# ------------------------------------------------------------------------------------- MBPP

def test_mbpp_rows_and_references_pass():
    data = load_source("mbpp", path=str(FIXTURES / "mbpp.jsonl"), min_tests=1)
    p2, p3 = data.problems
    assert p2.entry_point == "similar_elements" and p3.entry_point == "is_not_prime"
    assert all(isinstance(t, CodeTest) for t in p2.tests_for("all"))  # set(...) comparisons
    assert p3.tests_for("all")[0] == CallTest(input=[2], output=False)
    problems = {p.id: p for p in data.problems}
    with Sandbox(SandboxSettings(workers=1)) as sandbox:
        scores = list(score_samples(problems, data.references, sandbox, "all"))
    assert [s.status for s in scores] == ["passed", "passed"]


# ------------------------------------------------------------------------------------- hub

def test_hub_sources_fail_clearly_offline():
    code = ("from bdc.problems.sources import load_source, SourceError\n"
            "try:\n    load_source('apps')\nexcept SourceError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120).stdout
    assert "ERR cannot load 'codeparrot/apps'" in out and "--path" in out


def test_dataset_split_is_selectable_and_checked():
    train = load_source("apps", path=str(FIXTURES / "apps" / "test"), slice="all",
                        split="train")
    assert {p.id.split("/")[1] for p in train.problems} == {"train"}  # ids stay unique
    valid = load_source("codecontests", path=str(FIXTURES / "code_contests.jsonl"),
                        split="valid")
    assert valid.problems and all(p.id.startswith("codecontests/valid/")
                                  for p in valid.problems)
    with pytest.raises(SourceError, match="no split 'valid'; choose train or test"):
        load_source("apps", path=str(FIXTURES / "apps" / "test"), split="valid")
    with pytest.raises(SourceError, match="source 'mbpp' has no split"):
        load_source("mbpp", path=str(FIXTURES / "mbpp.jsonl"), split="train")
