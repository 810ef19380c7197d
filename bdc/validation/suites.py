"""The expectation suites, one per table: the single definition of what "fit to train on"
means. Thresholds are suite parameters (``$PARAMETER``), filled in from ``params.yaml`` at
run time, so the suites saved in the project's GX context (``gx/expectations``) do not change
when a setting does.
"""

from __future__ import annotations

from typing import Any

import great_expectations.expectations as gxe

from bdc.config import ValidateSettings


def P(name: str) -> dict[str, str]:  # noqa: N802 - GX's own spelling of a suite parameter
    return {"$PARAMETER": name}


def parameters(settings: ValidateSettings, max_programs: int,
               max_failed_share: float) -> dict[str, Any]:
    """The suite parameters for one run (the explore budget and tolerated failures come
    from the explore settings the data was made with)."""
    return {"min_sft_records": settings.min_sft_records,
            "min_thoughts": settings.min_thoughts, "max_thoughts": settings.max_thoughts,
            "max_thought_chars": settings.max_thought_chars,
            "max_program_chars": settings.max_program_chars,
            "max_test_overlap": settings.max_test_overlap,
            "max_programs": max_programs,
            "min_tree_share": 1.0 - max_failed_share}


def _columns(names: list[str]) -> list:
    return [gxe.ExpectColumnToExist(column=c) for c in names]


def _not_null(names: list[str]) -> list:
    return [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in names]


def _rates(names: list[str]) -> list:
    return [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0.0, max_value=1.0)
            for c in names]


def suites() -> dict[str, list]:
    """Table name -> its expectations."""
    sft = [
        gxe.ExpectTableRowCountToBeBetween(min_value=P("min_sft_records")),
        *_columns(["problem_id", "task", "prompt", "program", "thought_count",
                   "public_pass_rate", "hidden_pass_rate"]),
        *_not_null(["problem_id", "task", "prompt", "program"]),
        gxe.ExpectColumnValuesToBeInSet(column="task", value_set=["p2t", "t2s"]),
        gxe.ExpectColumnValuesToBeOfType(column="prompt", type_="str"),
        gxe.ExpectColumnValuesToBeOfType(column="program", type_="str"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["problem_id", "task"]),
        *_rates(["public_pass_rate", "hidden_pass_rate"]),
        # SFT records only from answers that passed every hidden test, as their tree says
        gxe.ExpectColumnValuesToBeInSet(column="hidden_pass_rate", value_set=[1.0]),
        gxe.ExpectColumnValuesToBeInSet(column="answer_in_tree", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="program_parses", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column="thought_count", min_value=P("min_thoughts"),
                                          max_value=P("max_thoughts")),
        gxe.ExpectColumnValuesToBeBetween(column="max_thought_chars", min_value=0,
                                          max_value=P("max_thought_chars")),
        gxe.ExpectColumnValuesToBeBetween(column="program_chars", min_value=1,
                                          max_value=P("max_program_chars")),
        gxe.ExpectColumnValuesToBeUnique(column="text_hash"),  # no exact duplicates
        gxe.ExpectColumnValuesToBeNull(column="near_duplicate_of"),
        # decontamination: no record overlapping a test problem, no hidden output leaked
        gxe.ExpectColumnValuesToBeBetween(column="test_overlap", min_value=0.0,
                                          max_value=P("max_test_overlap")),
        gxe.ExpectColumnValuesToBeNull(column="hidden_output_in"),
    ]
    prefs = [
        *_columns(["problem_id", "chosen", "rejected", "chosen_value", "rejected_value"]),
        *_not_null(["problem_id", "chosen", "rejected", "chosen_value", "rejected_value"]),
        *_rates(["chosen_value", "rejected_value"]),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="chosen_value",
                                                    column_B="rejected_value"),
    ]
    trees = [
        *_columns(["problem_id", "has_tree", "solved_hidden", "public_pass_rate",
                   "hidden_pass_rate", "programs"]),
        gxe.ExpectColumnValuesToBeUnique(column="problem_id"),
        # every explore problem has a tree, but for the failures explore tolerated
        gxe.ExpectColumnValuesToBeInSet(column="has_tree", value_set=[True],
                                        mostly=P("min_tree_share")),
        *_rates(["public_pass_rate", "hidden_pass_rate"]),
        gxe.ExpectColumnValuesToBeBetween(column="programs", min_value=0,
                                          max_value=P("max_programs")),
    ]
    problems = [
        *_columns(["problem_id", "pool", "prompt", "content_hash", "public_tests",
                   "hidden_tests"]),
        *_not_null(["problem_id", "pool", "prompt"]),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["pool", "problem_id"]),
        gxe.ExpectColumnValuesToBeUnique(column="problem_id"),  # disjoint pools, by id ...
        gxe.ExpectColumnValuesToBeUnique(column="content_hash"),  # ... and by content
        gxe.ExpectColumnValuesToBeBetween(column="public_tests", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="hidden_tests", min_value=1),
    ]
    return {"sft": sft, "prefs": prefs, "trees": trees, "problems": problems}
