"""The mini profile's text format (``### Problem / ### Thoughts / ### Code``): the one format
the tiny models are trained on and prompted with, shared by pretraining, the search's agents
and the System-1 solver; the parsing of a plan's numbered lines, which every format uses; and
the program in a real model's reply (:func:`program_in`).
"""

from __future__ import annotations

import ast
import re


def render(prompt: str, thoughts: list[str] | None = None, code: str | None = None) -> str:
    """The one text format the tiny models are trained on and prompted with."""
    text = f"### Problem\n{prompt}\n### Thoughts\n"
    if thoughts is None:
        return text
    text = render_state(prompt, thoughts) + CODE_HEADER
    return text if code is None else text + code


CODE_HEADER = "### Code\n"


def render_state(prompt: str, thoughts: list[str]) -> str:
    """A search state in the same format: the problem and the thoughts so far, ready for
    the next thought line (or for the code header, when the model deems the chain done)."""
    return f"### Problem\n{prompt}\n### Thoughts\n" + "".join(
        f"{i}. {t}\n" for i, t in enumerate(thoughts, 1))


_STEP = re.compile(r"^\s*(?:\d+[.)]|[-*])\s+(.+?)\s*$")


def parse_steps(text: str) -> list[str]:
    """The numbered (or bulleted) lines of a plan: ``1. Sort xs.`` -> ``Sort xs.``."""
    return [m.group(1) for line in text.splitlines() if (m := _STEP.match(line))]


# ----------------------------------------------------------------------------- real replies

_BLOCK = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|\Z)", re.S)


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def parseable_prefix(code: str) -> str:
    """``code`` if it parses, else its longest run of first lines that does (a reply cut off
    by the token limit mid-statement keeps its complete functions)."""
    lines = code.rstrip().splitlines()
    for end in range(len(lines), 0, -1):
        head = "\n".join(lines[:end]).rstrip()
        if head and parses(head):
            return head + "\n"
    return ""


def _functions(code: str) -> set[str]:
    return {n.name for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)}


def program_in(text: str, entry_point: str | None = None) -> str:
    """The program in a model's reply, as real instruction-tuned models write it (built from
    SmolLM2-135M-Instruct's replies, tests/fixtures/real_samples.jsonl): fenced code with
    prose around it; several blocks (a class, then the function; the function, then example
    usage); a block the token limit cut off before its closing fence; no fence at all.
    Among the fenced blocks (each cut to its part that parses): the first that defines
    ``entry_point``, else the first that defines a top-level function, else the first with
    any code; without a fence, the reply's own part that parses. Empty: no code."""
    blocks = [parseable_prefix(m.group(1)) for m in _BLOCK.finditer(text)]
    blocks = [b for b in blocks if b.strip()]
    if not blocks:
        return parseable_prefix(text) if "```" not in text else ""
    for wanted in ([entry_point] if entry_point else []) + [None]:
        for block in blocks:
            names = _functions(block)
            if (wanted in names) if wanted else names:
                return block
    return blocks[0]


def program_closed(text: str) -> bool:
    """Whether ``text`` holds a closed fenced block that defines a function: the block
    :func:`program_in` (without an entry point) takes, whatever text follows it."""
    for match in _BLOCK.finditer(text):
        if match.group(0).endswith("```"):
            block = parseable_prefix(match.group(1))
            if block.strip() and _functions(block):
                return True
    return False


_TOP_LEVEL = re.compile(r"^\S", re.M)


def function_body(continuation: str) -> str:
    """A completion model's continuation of a function prompt, cut where the function ends:
    at the first line that starts in column 0 (the next ``def``, a ``print``, a comment:
    HumanEval's stop sequences, as one rule). Gemma 3 270M, a base model, writes the body
    and then keeps going with more functions."""
    match = _TOP_LEVEL.search(continuation)
    return continuation if match is None else continuation[:match.start()]


def body_written(code: str, entry_point: str | None) -> bool:
    """Whether ``code`` (which parses) defines ``entry_point`` with more than a docstring or
    ``pass``: a completion model that stopped at once left only the prompt's stub."""
    if not entry_point:
        return True
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.FunctionDef) and node.name == entry_point:
            return any(not (isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(
                s.value, ast.Constant))) for s in node.body)
    return False
