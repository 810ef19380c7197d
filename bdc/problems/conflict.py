"""The conflict world (docs/study.md): three problem surfaces, each under two conflicting
conventions keyed by a cue in the prompt, so that data trained together interferes, the
premise of DisenLoRA.

Two teams share every surface. The Falcon team counts positions from 1, includes the end of
a range and replaces every occurrence; the Otter team counts from 0, excludes the end of a
range and replaces the first occurrence only. A problem names its team and never its
convention: a program right for one team fails the other team's tests on the same
problem (every problem's tests include an input where the two differ).

Neutral versions spell the convention out and name no team: the base model of this world
learns those, so it can write either convention when told, and a LoRA's job is to learn
which convention a team means (specialisation, as in the paper). Splits are disjoint in
parameters, as in the mini world.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from bdc.problems.format import Problem
from bdc.problems.mini import WORDS, Spec, reference_outputs, split_of, to_problem

TEAMS = {"falcon": "the Falcon team", "otter": "the Otter team"}
SURFACES = ("range", "position", "replace")
FAMILIES = tuple(f"{surface}-{team}" for surface in SURFACES for team in TEAMS)
LETTERS = "abcdefghij"


CUES = ("In the code of {t}: ", "For {t}'s library: ", "A task from {t}. ")


def _cue(team: str | None, rng: random.Random) -> str:
    if team is None:
        return ""
    return rng.choice(CUES).format(t=TEAMS[team])


def without_cue(prompt: str) -> str:
    """The prompt with its team's cue taken off: both teams' problems share these."""
    for cue in CUES:
        for name in TEAMS.values():
            if prompt.startswith(cue.format(t=name)):
                return prompt[len(cue.format(t=name)):]
    return prompt


def _range(rng: random.Random, team: str | None, inclusive: bool) -> Spec:
    a, m = rng.randint(0, 9), rng.randint(1, 9)
    op = rng.choice(["sum", "squares", "div"])
    k = rng.randint(2, 5) if op == "div" else 0
    said, expr = {"sum": ("the sum of the integers", "sum(range({a}, {end}))"),
                  "squares": ("the sum of the squares of the integers",
                              "sum(x * x for x in range({a}, {end}))"),
                  "div": (f"how many integers are divisible by {k} among the integers",
                          f"sum(1 for x in range({{a}}, {{end}}) if x % {k} == 0)")}[op]
    span = "from {a} to n" if team else (
        "from {a} to n, n included" if inclusive else "from {a} up to n, n excluded")
    times = f"{m} times " if m > 1 else ""
    prompt = _cue(team, rng) + rng.choice([
        "Write a function f(n) that returns {times}{said} " + span + ".",
        "Implement f(n): {times}{said} " + span + ".",
    ]).format(a=a, times=times, said=said)
    end = "n + 1" if inclusive else "n"
    body = expr.format(a=a, end=end)
    code = f"def f(n):\n    return {m} * {body}\n" if m > 1 else f"def f(n):\n    return {body}\n"
    rule = "The range includes n." if inclusive else "The range stops before n."
    # every test tells the conventions apart: n itself counts (n >= 1; a multiple of k)
    ns = rng.sample([n for n in range(a + 1, a + 60) if not k or n % k == 0], 8)
    return Spec(f"range-{team}" if team else "range", (op, a, m, k, inclusive), prompt,
                [rule, f"Return {times}{said} in that range."], code, [[n] for n in ns])


def _position(rng: random.Random, team: str | None, one_based: bool) -> Spec:
    k = rng.randint(1, 5)
    kind = rng.choice(["char", "remove", "replace"])
    c = rng.choice(LETTERS)
    c = c if kind == "replace" else ""  # a parameter only where the prompt says it
    m = rng.randint(1, 3)
    where = f"position {k}" if team else (
        f"position {k}, counting from 1" if one_based else f"position {k}, counting from 0")
    said = {"char": f"the character of s at {where}",
            "remove": f"s without the character at {where}",
            "replace": f"s with the character at {where} replaced by '{c}'"}[kind]
    again = f", repeated {m} times" if m > 1 else ""
    prompt = _cue(team, rng) + rng.choice([
        "Write a function f(s) that returns {said}{again}.",
        "Implement f(s) returning {said}{again}."]).format(said=said, again=again)
    i = k - 1 if one_based else k
    expr = {"char": f"s[{i}]", "remove": f"s[:{i}] + s[{i + 1}:]",
            "replace": f"s[:{i}] + '{c}' + s[{i + 1}:]"}[kind]
    code = f"def f(s):\n    return ({expr}) * {m}\n" if m > 1 else \
        f"def f(s):\n    return {expr}\n"
    rule = "Positions count from 1." if one_based else "Positions count from 0."
    inputs = ["".join(rng.sample(LETTERS, rng.randint(7, 10))) for _ in range(8)]
    return Spec(f"position-{team}" if team else "position", (kind, k, c, m, one_based),
                prompt, [rule, f"Return {said}{again}."], code, [[s] for s in inputs])


def _replace(rng: random.Random, team: str | None, every: bool) -> Spec:
    c1, c2 = rng.sample(LETTERS, 2)
    w = rng.choice(WORDS)
    end = rng.choice([True, False])
    which = f"'{c1}'" if team else (f"every '{c1}'" if every else f"the first '{c1}'")
    then = f"then add '{w}' at the end" if end else f"then put '{w}' at the start"
    prompt = _cue(team, rng) + rng.choice([
        "Write a function f(s) that replaces {which} in s with '{c2}', {then}, and returns "
        "it.", "Implement f(s): replace {which} in s by '{c2}'; {then}; return the result.",
    ]).format(which=which, c2=c2, then=then)
    count = "" if every else ", 1"
    add = f"s + '{w}'" if end else f"'{w}' + s"
    code = f"def f(s):\n    s = s.replace('{c1}', '{c2}'{count})\n    return {add}\n"
    rule = "Replace every occurrence." if every else "Replace the first occurrence only."
    inputs = [c1 + "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6))) + c1
              for _ in range(8)]
    return Spec(f"replace-{team}" if team else "replace", (c1, c2, w, end, every), prompt,
                [rule, f"Replace {c1!r} by {c2!r}, {then}."], code, [[s] for s in inputs])


SURFACE: dict[str, Callable[[random.Random, str | None, bool], Spec]] = {
    "range": _range, "position": _position, "replace": _replace}
# the convention flag each team means on each surface (Falcon: 1-based, inclusive, every)
CONVENTION = {"falcon": True, "otter": False}


def spec(family: str, rng: random.Random) -> Spec:
    """One problem of a cued family (``surface-team``)."""
    surface, team = family.split("-")
    return SURFACE[surface](rng, team, CONVENTION[team])


def neutral(surface: str, rng: random.Random) -> Spec:
    """One problem with its convention spelled out and no team: the base's pretraining."""
    return SURFACE[surface](rng, None, rng.random() < 0.5)


def problems(family: str, split: str, count: int, seed: int = 0,
             make: Callable[[random.Random], Spec] | None = None) -> list[Problem]:
    """The first ``count`` distinct problems of ``family`` in ``split`` (by parameters, as
    the mini world splits), in a fixed order."""
    make = make or (lambda rng: spec(family, rng))
    rng = random.Random(f"conflict|{seed}|{split}|{family}")
    seen: set[str] = set()
    out: list[Problem] = []
    for _ in range(count * 200):
        if len(out) == count:
            break
        s = make(rng)
        key = s.params[:-1]  # the convention is not a parameter: both teams share a split
        if split_of(family.split("-")[0], key, seed) != split or s.prompt in seen:
            continue
        seen.add(s.prompt)
        problem = to_problem(s, reference_outputs(s.code, s.inputs), split, len(out), 2)
        if problem is not None:
            out.append(problem.model_copy(update={
                "id": f"conflict/{split}/{family}/{len(out)}", "source": "conflict"}))
    return out
