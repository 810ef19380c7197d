"""The mini profile's text format (``### Problem / ### Thoughts / ### Code``): the one format
the tiny models are trained on and prompted with, shared by pretraining, the search's agents
and the System-1 solver; and the parsing of a plan's numbered lines, which every format uses.
"""

from __future__ import annotations

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
