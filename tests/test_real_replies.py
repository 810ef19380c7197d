"""The program in real models' replies, on samples the packaged real models wrote here
(tests/fixtures/real_samples.jsonl: SmolLM2-135M-Instruct through the System-1 chat
template, greedy, on mini and HumanEval problems; Gemma 3 270M continuing HumanEval
prompts). Before this, a zero-shot reply without the trained code header gave no program
at all, and the agents took the last fenced block (often the example usage)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bdc.llm.prompts import function_body, parses, program_in

SAMPLES = {(r["model"], r["problem_id"]): r for r in map(json.loads, (
    Path(__file__).parent / "fixtures/real_samples.jsonl").read_text().splitlines())}
SMOL, GEMMA = "smollm2-135m-instruct", "gemma-3-270m"


def reply(model: str, problem: str) -> str:
    return SAMPLES[(model, problem)]["completion"]


@pytest.mark.parametrize("key", [k for k in SAMPLES if k[0] == SMOL], ids=lambda k: k[1])
def test_every_real_reply_gives_code_that_parses_or_none(key):
    program = program_in(reply(*key))
    assert program == "" or parses(program)
    assert "This function" not in program and "Here is" not in program  # no prose


def test_prose_around_one_block():
    assert program_in(reply(SMOL, "mini/test/arith/0")) == \
        "def multiply_by_6(x):\n    return x * 7\n"  # its own name: scored as written


def test_the_block_that_defines_the_function_not_a_class_before_it():
    program = program_in(reply(SMOL, "mini/test/branch/7"), "f")
    assert program.startswith("def f(x):") and "class" not in program


def test_example_usage_stays_with_its_function():
    program = program_in(reply(SMOL, "mini/test/string/2"))
    assert program.startswith("def reverse_s(s):") and "print(reverse_s" in program


def test_a_block_cut_off_by_the_token_limit():
    """The reply ran out of tokens inside a list literal, without a closing fence: no
    complete statement survives, so no program (not the broken text)."""
    text = reply(SMOL, "HumanEval/1")
    assert "```" in text and text.count("```") == 1
    assert program_in(text) == ""
    cut = "```python\ndef g():\n    return 1\n\ndef h():\n    return [\n        1,"
    assert program_in(cut) == "def g():\n    return 1\n"


def test_a_reply_without_a_fence():
    program = program_in(reply(SMOL, "HumanEval/2"))
    assert program.startswith("def truncate_number(number: float) -> float:")
    assert program_in("I cannot solve this.") == ""


def test_a_completion_model_is_cut_where_its_function_ends():
    """Gemma 3 270M (a base model) writes the body, then more functions."""
    text = reply(GEMMA, "HumanEval/0")
    body = function_body(text)
    assert "def is_close_to_threshold" in text and "def " not in body
    assert body.startswith("    if len(numbers) > threshold:") and parses(
        SAMPLES[(GEMMA, "HumanEval/0")]["prompt"] + body)


def test_the_chat_template_reads_a_zero_shot_reply():
    from bdc.llm.system1 import ChatTemplate

    class Tokenizer:
        eos_token = "<|im_end|>"

    thoughts, program = ChatTemplate(Tokenizer()).parse(reply(SMOL, "mini/test/filter/5"))
    assert len(thoughts) == 3 and thoughts[0].startswith("First, I will write")
    assert program.startswith("def f(x):") and parses(program)
