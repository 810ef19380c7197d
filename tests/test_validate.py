"""Stage validate: every expectation passes on good data and fails on a crafted bad input
(naming the problems at fault); the command fails with exit 2 and writes no report; the GX
context in git holds exactly the suites the code defines."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bdc.config import Params
from bdc.problems import mini
from bdc.problems.format import write_problems
from tests.conftest import ROOT

EXPLORE = mini.load(slice="explore", limit=2).problems
TEST = mini.load(slice="test", limit=1).problems


def tree_record(problem, solved: bool = True) -> dict:
    ref = problem.meta["reference"]
    hidden = {"status": "passed" if solved else "failed", "passed": 4 if solved else 0,
              "total": 4, "pass_rate": 1.0 if solved else 0.0}
    return {"problem_id": problem.id, "fingerprint": "f", "solved_public": True,
            "solved_hidden": solved, "answer": {
                "node": 1, "agent": "coder", "thoughts": ref["thoughts"],
                "thought_agents": ["planner"] * len(ref["thoughts"]),
                "program": ref["program"], "public_pass_rate": 1.0, "hidden": hidden},
            "tree": {"nodes": [{}, {}], "programs": 4, "tokens": 100}}


def sft_of(problem) -> list[dict]:
    ref = problem.meta["reference"]
    base = {"problem_id": problem.id, "source": "mini", "kind": "function", "entry_point": "f",
            "prompt": problem.prompt, "thoughts": ref["thoughts"], "program": ref["program"],
            "agent": "coder", "thought_agents": ["planner"], "public_pass_rate": 1.0,
            "hidden_pass_rate": 1.0}
    return [{**base, "task": "p2t"}, {**base, "task": "t2s"}]


def write_explore(folder: Path, trees: list[dict], sft: list[dict], prefs: list[dict]) -> None:
    (folder / "trees").mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(trees):
        (folder / "trees" / f"{i}.json").write_text(json.dumps(t))
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (folder / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))


def good() -> dict:
    return {"trees": [tree_record(p) for p in EXPLORE],
            "sft": [r for p in EXPLORE for r in sft_of(p)],
            "prefs": [{"problem_id": EXPLORE[0].id, "prompt": "p", "thoughts": [],
                       "chosen": "a", "rejected": "b", "chosen_value": 0.5,
                       "rejected_value": 0.0}],
            "explore": list(EXPLORE), "test": list(TEST)}


@pytest.fixture(scope="module")
def gx_root(tmp_path_factory) -> Path:
    """A copy of the project's GX context: runs add results, not suites."""
    root = tmp_path_factory.mktemp("gx-project")
    shutil.copytree(ROOT / "gx", root / "gx", ignore=shutil.ignore_patterns("uncommitted"))
    return root


def validate(tmp_path: Path, gx_root: Path, data: dict, **settings):
    from bdc.validation.runner import validate as run_validation

    explore_dir, problems_dir = tmp_path / "explore", tmp_path / "problems"
    write_explore(explore_dir, data["trees"], data["sft"], data["prefs"])
    write_problems(problems_dir / "explore.jsonl", data["explore"])
    write_problems(problems_dir / "test.jsonl", data["test"])
    params = Params()
    if settings:
        params = params.model_copy(update={"validate_": params.validate_.model_copy(
            update=settings)})
    return run_validation(params, explore_dir, problems_dir, tmp_path / "out", gx_root)


def test_good_data_passes_every_expectation_and_builds_data_docs(tmp_path, gx_root):
    metrics, failed = validate(tmp_path, gx_root, good())
    assert failed == [] and metrics["success"] and metrics["expectations"] >= 40
    assert (tmp_path / "out/docs/index.html").exists()
    # readable offline: Bootstrap from the docs' own folder (the pages were unstyled without
    # the CDN) and no logo fetched from S3 with the data context's id
    docs = tmp_path / "out/docs"
    assert (docs / "static/vendor/bootstrap.min.css").stat().st_size > 100_000
    pages = [*docs.rglob("*.html"), *docs.rglob("*.css")]
    fetched = ("bootstrapcdn.com/bootstrap/4.3.1/css", "great-expectations-web-assets")
    assert len(pages) > 3 and not [p for p in pages if any(f in p.read_text() for f in fetched)]
    page = next(docs.glob("expectations/*.html"))
    assert 'href="../static/vendor/bootstrap.min.css"' in page.read_text()


def sft_change(fn):
    def change(data):
        fn(data["sft"])
        return data
    return change


def corrupt_tree(data):
    data["trees"][1]["solved_hidden"] = False  # the tree says this answer failed
    return data


def duplicate_record(data):
    data["sft"].append(dict(data["sft"][1]))
    return data


def copied_record(data):  # another problem's record, word for word
    data["sft"].append({**data["sft"][1], "problem_id": "mini/explore/other/0"})
    data["trees"].append({**data["trees"][0], "problem_id": "mini/explore/other/0"})
    return data


def near_copy(data):  # the same record, one letter apart
    row = dict(data["sft"][1])
    row.update(problem_id="mini/explore/other/1", program=row["program"].replace("x", "y", 1))
    data["sft"].append(row)
    data["trees"].append({**data["trees"][0], "problem_id": "mini/explore/other/1"})
    return data


def a_test_problem_in_training(data):
    for r in data["sft"][:2]:
        r["prompt"] = TEST[0].prompt
    return data


def leak_hidden_output(data):
    long = next(p for p in EXPLORE if p.meta["family"] == "string")
    output = next(t.output for t in long.tests.hidden if len(t.output) >= 8)
    data["sft"][1]["program"] += f"\n# {output}\n"
    return data


def pools_share_content(data):
    data["test"].append(EXPLORE[0].model_copy(update={"id": "mini/test/copy/0"}))
    return data


def pools_share_ids(data):
    data["test"].append(TEST[0].model_copy(update={"id": EXPLORE[0].id, "prompt": "other"}))
    return data


def worse_chosen(data):
    data["prefs"][0]["chosen_value"] = -0.5
    return data


def missing_tree(data):
    data["trees"] = data["trees"][1:]
    return data


def too_many_programs(data):
    data["trees"][0]["tree"]["programs"] = 5000
    return data


CASES = {
    "missing field": (sft_change(lambda s: [r.pop("program") for r in s]),
                      "sft", "expect_column_values_to_not_be_null"),
    "null prompt": (sft_change(lambda s: s[0].update(prompt=None)),
                    "sft", "expect_column_values_to_not_be_null"),
    "duplicate (problem, task)": (duplicate_record, "sft",
                                  "expect_compound_columns_to_be_unique"),
    "pass rate 1.5": (sft_change(lambda s: s[1].update(public_pass_rate=1.5)),
                      "sft", "expect_column_values_to_be_between"),
    "answer failed hidden tests": (sft_change(lambda s: s[1].update(hidden_pass_rate=0.5)),
                                   "sft", "expect_column_values_to_be_in_set"),
    "not what the tree says": (corrupt_tree, "sft", "expect_column_values_to_be_in_set"),
    "unparsable program": (sft_change(lambda s: s[1].update(program="def f(:\n")),
                           "sft", "expect_column_values_to_be_in_set"),
    "no thoughts": (sft_change(lambda s: s[1].update(thoughts=[])),
                    "sft", "expect_column_values_to_be_between"),
    "thought too long": (sft_change(lambda s: s[1].update(thoughts=["x" * 500])),
                         "sft", "expect_column_values_to_be_between"),
    "exact duplicate": (copied_record, "sft", "expect_column_values_to_be_unique"),
    "near duplicate": (near_copy, "sft", "expect_column_values_to_be_null",
                       {"near_duplicate_threshold": 0.8}),
    "test problem in training": (a_test_problem_in_training, "sft",
                                 "expect_column_values_to_be_between"),
    "hidden output in a record": (leak_hidden_output, "sft",
                                  "expect_column_values_to_be_null"),
    "pools share content": (pools_share_content, "problems",
                            "expect_column_values_to_be_unique"),
    "pools share ids": (pools_share_ids, "problems", "expect_column_values_to_be_unique"),
    "chosen worse than rejected": (worse_chosen, "prefs",
                                   "expect_column_values_to_be_between"),
    "a problem without a tree": (missing_tree, "trees", "expect_column_values_to_be_in_set"),
    "more programs than the budget": (too_many_programs, "trees",
                                      "expect_column_values_to_be_between"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_each_expectation_fails_on_its_bad_input(tmp_path, gx_root, case):
    change, table, expectation, *settings = CASES[case]
    _, failed = validate(tmp_path, gx_root, change(good()), **(settings[0] if settings else {}))
    assert any(f["table"] == table and f["expectation"] == expectation for f in failed), \
        failed
    assert not (tmp_path / "out/report.json").exists()


def test_a_table_without_a_required_column_fails(tmp_path, gx_root):
    from bdc.validation import suites, tables
    from bdc.validation.runner import check, context, sync

    validate(tmp_path, gx_root, good())  # writes the good inputs
    frames = tables.build(tmp_path / "explore", tmp_path / "problems", Params().validate_)
    frames = {"sft": frames["sft"].drop(columns=["program"])}
    ctx = context(gx_root)
    sync(ctx, suites.suites())
    _, failed = check(ctx, frames, suites.parameters(Params().validate_, 10, 0.0))
    assert {"table": "sft", "column": "program"} in [
        {"table": f["table"], "column": f["kwargs"].get("column")} for f in failed
        if f["expectation"] == "expect_column_to_exist"]


def test_a_chosen_not_above_rejected_fails_the_pair_expectation(tmp_path, gx_root):
    data = good()
    data["prefs"][0]["chosen_value"] = 0.0
    _, failed = validate(tmp_path, gx_root, data)
    assert [f["expectation"] for f in failed] == \
        ["expect_column_pair_values_a_to_be_greater_than_b"]


def test_failures_name_the_offending_problems(tmp_path, gx_root):
    from bdc.validation.runner import describe

    _, failed = validate(tmp_path, gx_root, sft_change(
        lambda s: s[3].update(program="def f(:\n"))(good()))
    assert failed[0]["problems"] == [EXPLORE[1].id]
    assert EXPLORE[1].id in describe(failed) and "program_parses" in describe(failed)


def test_the_committed_gx_context_holds_the_code_s_suites():
    """gx/ in git is what the code defines: a changed suite must be committed with it."""
    from bdc.validation.runner import _same
    from bdc.validation.suites import suites

    class Stored:  # the committed JSON, as GX would load it
        def __init__(self, path: Path):
            from great_expectations.expectations.expectation_configuration import (
                ExpectationConfiguration,
            )

            self.expectations = [ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"])
                                 for e in json.loads(path.read_text())["expectations"]]

    for name, expectations in suites().items():
        assert _same(Stored(ROOT / "gx/expectations" / f"{name}.json"), expectations), name
        assert (ROOT / "gx/checkpoints" / f"{name}.json").exists()


def test_bdc_validate_fails_naming_each_corrupted_problem(project):
    """The corrupted explore folder of the issue: duplicates, a pass rate of 1.5, an
    unparsable program, a test problem's text in a record, a hidden output in a record."""
    data = good()
    data["sft"].append(dict(data["sft"][1]))  # duplicate
    data["sft"][3]["public_pass_rate"] = 1.5
    data["sft"][2]["program"] = "def f(:\n"
    data = leak_hidden_output(data)
    explore = project / "bad"
    write_explore(explore, data["trees"], data["sft"], data["prefs"])
    write_problems(project / "data/problems/explore.jsonl", data["explore"])
    write_problems(project / "data/problems/test.jsonl", data["test"])
    rows = [json.loads(line) for line in (explore / "sft.jsonl").read_text().splitlines()]
    rows[0]["prompt"] = rows[1]["prompt"] = TEST[0].prompt  # a test problem's text
    (explore / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run(["bdc", "validate", "--explore-dir", "bad", "--out-dir", "val"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr
    for column in ("problem_id, task", "public_pass_rate", "program_parses", "test_overlap",
                   "hidden_output_in"):
        assert column.split(", ")[0] in err, column
    for pid in (EXPLORE[0].id, EXPLORE[1].id):
        assert pid in err
    assert (project / "val/docs/index.html").exists() and not (project / "val/report.json"
                                                               ).exists()


def truncate_last_sft_line(folder: Path) -> None:
    text = (folder / "sft.jsonl").read_text()
    (folder / "sft.jsonl").write_text(text[:len(text) - 40])


def replace_sft_line(line: str):
    def change(folder: Path) -> None:
        lines = (folder / "sft.jsonl").read_text().splitlines(keepends=True)
        lines[2] = line + "\n"
        (folder / "sft.jsonl").write_text("".join(lines))
    return change


def non_string_program(folder: Path) -> None:
    lines = (folder / "sft.jsonl").read_text().splitlines(keepends=True)
    row = json.loads(lines[2])
    row["program"] = 5
    lines[2] = json.dumps(row) + "\n"
    (folder / "sft.jsonl").write_text("".join(lines))


def non_string_thought_in_a_pair(folder: Path) -> None:
    row = json.loads((folder / "prefs.jsonl").read_text())
    row["thoughts"] = [{"step": 1}]
    (folder / "prefs.jsonl").write_text(json.dumps(row) + "\n")


def truncate_a_tree(folder: Path) -> None:
    path = folder / "trees/1.json"
    path.write_text(path.read_text()[:50])


# what each malformed input must be named by: (the file, the line or field)
MALFORMED = {
    "truncated last line": (truncate_last_sft_line, "sft.jsonl:LAST:", "invalid JSON"),
    "not JSON": (replace_sft_line("def f(x): return x"), "sft.jsonl:3:", "invalid JSON"),
    "a JSON array": (replace_sft_line('["a", "b"]'), "sft.jsonl:3:", "expected a JSON object"),
    "non-string program": (non_string_program, "sft.jsonl:3:", "program"),
    "non-string thought": (non_string_thought_in_a_pair, "prefs.jsonl:1:", "thoughts[0]"),
    "truncated tree file": (truncate_a_tree, "trees/1.json:", "truncated"),
}


def good_inputs(explore: Path, problems: Path, where: str) -> str:
    """Good explore outputs and pools written there; ``where`` with the SFT file's last line
    number for ``LAST``."""
    data = good()
    write_explore(explore, data["trees"], data["sft"], data["prefs"])
    write_problems(problems / "explore.jsonl", data["explore"])
    write_problems(problems / "test.jsonl", data["test"])
    return where.replace("LAST", str(len(data["sft"])))


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_explored_data_is_named_by_file_line_and_field(tmp_path, case):
    """Issue 26.5: these crashed with bare tracebacks (json.loads in the MLflow dataset
    logging, len() of a non-string in the tables) naming no file, line or field."""
    from bdc.jsonl import RecordError
    from bdc.validation import tables

    change, where, what = MALFORMED[case]
    where = good_inputs(tmp_path / "explore", tmp_path / "problems", where)
    tables.build(tmp_path / "explore", tmp_path / "problems", Params().validate_)  # good: fine
    change(tmp_path / "explore")
    with pytest.raises(RecordError) as caught:
        tables.build(tmp_path / "explore", tmp_path / "problems", Params().validate_)
    assert where in str(caught.value) and what in str(caught.value), caught.value


@pytest.mark.parametrize("case", ["truncated last line", "non-string program"])
def test_bdc_validate_on_malformed_lines_names_them_and_leaves_no_stale_success(project,
                                                                               case):
    """Issue 26.5: a truncated SFT line crashed validate in the MLflow dataset logging, a
    non-string program in the tables (exit 1, no file named), and the last run's metrics
    still said {"success": true}."""
    change, where, what = MALFORMED[case]
    where = good_inputs(project / "bad", project / "data/problems", where)
    change(project / "bad")
    metrics = project / "data/metrics/validate.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps({"success": True, "failed": 0}))  # the last run's
    done = subprocess.run(["bdc", "validate", "--explore-dir", "bad", "--out-dir", "val"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert f"bad/{where}" in done.stderr and what in done.stderr, done.stderr
    assert json.loads(metrics.read_text())["success"] is False
    assert where in json.loads(metrics.read_text())["error"]
    assert not (project / "val/report.json").exists()
