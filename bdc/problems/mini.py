"""The mini benchmark: six parametric problem families with clearly different solution shapes.

A small world where BDC's claims can be tested on a 2-core machine: the families are
heterogeneous (so clustering has structure to find), each has thousands of distinct problems
(constants, operations, predicates x several phrasings), and every problem carries a reference
thought chain and solution whose outputs define its tests.

Splits are disjoint in *parameters*: each parameter combination belongs to exactly one of
``pretrain`` / ``explore`` / ``test`` (by a seeded hash), so no test problem's solution, in
any phrasing, appears in another split. The family is recorded in ``meta`` for evaluating
clustering only; ``Problem.public_view`` drops it together with the reference.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from bdc.problems.format import CallTest, Problem, split_tests
from bdc.problems.sources import SourceData, SourceError

SPLITS = {"pretrain": (0, 70), "explore": (70, 85), "test": (85, 100)}  # percent of params
TESTS_PER_PROBLEM = 8
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "maple", "robot",
         "ocean", "candle", "forest", "silver", "rocket", "garden", "pepper"]
LABELS = [("low", "mid", "high"), ("cold", "warm", "hot"), ("small", "medium", "large"),
          ("slow", "steady", "fast"), ("weak", "fair", "strong"), ("short", "normal", "tall"),
          ("cheap", "fair", "pricey"), ("early", "ontime", "late")]


@dataclass
class Spec:
    """One problem before rendering: what to ask, how to think, what to write."""

    family: str
    params: tuple
    prompt: str
    thoughts: list[str]
    code: str
    inputs: list[list]


def _phrase(rng: random.Random, options: list[str], **fields) -> str:
    return rng.choice(options).format(**fields)


# ----------------------------------------------------------------------------- families

def _arith(rng: random.Random) -> Spec:
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    a, b = rng.randint(2, 19), rng.randint(2, 19)

    def words(op: str, k: int, obj: str) -> str:
        return {"+": f"add {k} to {obj}", "-": f"subtract {k} from {obj}",
                "*": f"multiply {obj} by {k}"}[op]

    first = f"x {op1} {a}"
    if op2 == "*" and op1 != "*":
        first = f"({first})"
    w1, w2 = words(op1, a, "x"), words(op2, b, "the result")
    prompt = _phrase(rng, [
        "Write a function f(x) that takes an integer x, {w1}, then {w2}, and returns it.",
        "Given an integer x, {w1} and then {w2}. Implement this as f(x).",
        "Implement f(x): {w1}; next, {w2}. Return the final value.",
    ], w1=w1, w2=w2)
    return Spec("arith", (op1, a, op2, b), prompt,
                [f"{w1[0].upper()}{w1[1:]}.", f"{w2[0].upper()}{w2[1:]}."],
                f"def f(x):\n    return {first} {op2} {b}\n",
                [[x] for x in rng.sample(range(-50, 51), TESTS_PER_PROBLEM)])


def _string(rng: random.Random) -> Spec:
    letters = "abcdefghij"
    kinds = rng.sample(["replace", "remove", "append", "prepend", "repeat", "reverse",
                        "upper"], rng.choice([1, 2]))
    steps, lines, params = [], [], []
    for kind in kinds:
        if kind == "replace":
            c1, c2 = rng.sample(letters, 2)
            steps.append(f"replace every '{c1}' with '{c2}'")
            lines.append(f"s = s.replace('{c1}', '{c2}')")
            params.append((kind, c1, c2))
        elif kind == "remove":
            c = rng.choice(letters)
            steps.append(f"remove every '{c}'")
            lines.append(f"s = s.replace('{c}', '')")
            params.append((kind, c))
        elif kind in ("append", "prepend"):
            w = rng.choice(WORDS)
            steps.append(f"{'add' if kind == 'append' else 'put'} '{w}' at the "
                         f"{'end' if kind == 'append' else 'start'}")
            lines.append(f"s = s + '{w}'" if kind == "append" else f"s = '{w}' + s")
            params.append((kind, w))
        elif kind == "repeat":
            k = rng.randint(2, 4)
            steps.append(f"repeat the string {k} times")
            lines.append(f"s = s * {k}")
            params.append((kind, k))
        else:
            steps.append("reverse it" if kind == "reverse" else "make it uppercase")
            lines.append("s = s[::-1]" if kind == "reverse" else "s = s.upper()")
            params.append((kind,))
    prompt = _phrase(rng, [
        "Write a function f(s) that takes a string s, {steps}, and returns the new string.",
        "Given a string s, {steps}. Implement this as f(s) returning the result.",
        "Implement f(s): {steps}, then return s.",
    ], steps=", then ".join(steps))
    body = "".join(f"    {line}\n" for line in lines)
    inputs = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9)))
              for _ in range(TESTS_PER_PROBLEM)]
    return Spec("string", tuple(params), prompt,
                [f"{s[0].upper()}{s[1:]}." for s in steps],
                f"def f(s):\n{body}    return s\n", [[s] for s in inputs])


def _filter(rng: random.Random) -> Spec:
    agg = rng.choice(["sum", "count", "max", "min"])
    pred = rng.choice(["gt", "lt", "div", "ndiv"])
    k = rng.randint(2, 12) if pred in ("div", "ndiv") else rng.randint(0, 40)
    cond, said = {"gt": (f"x > {k}", f"greater than {k}"), "lt": (f"x < {k}", f"less than {k}"),
                  "div": (f"x % {k} == 0", f"divisible by {k}"),
                  "ndiv": (f"x % {k} != 0", f"not divisible by {k}")}[pred]
    result, agg_said = {"sum": ("sum(kept)", "sum"), "count": ("len(kept)", "count"),
                        "max": ("max(kept, default=0)", "largest"),
                        "min": ("min(kept, default=0)", "smallest")}[agg]
    prompt = _phrase(rng, [
        "Write a function f(xs) that returns the {a} of the numbers in xs that are {p} "
        "(0 if there are none).",
        "Given a list of integers xs, keep the numbers {p} and return their {a} "
        "(0 if none are kept). Implement f(xs).",
        "Implement f(xs): the {a} of the elements {p}, or 0 when no element qualifies.",
    ], a=agg_said, p=said)
    inputs = [[rng.randint(-20, 40) for _ in range(rng.randint(0, 8))]
              for _ in range(TESTS_PER_PROBLEM)]
    return Spec("filter", (agg, pred, k), prompt,
                [f"Keep the numbers in xs that are {said}.",
                 f"Return the {agg_said} of the kept numbers, or 0 if there are none."],
                f"def f(xs):\n    kept = [x for x in xs if {cond}]\n    return {result}\n",
                [[xs] for xs in inputs])


def _branch(rng: random.Random) -> Spec:
    lo, mid, hi = rng.choice(LABELS)
    a = rng.randrange(5, 60, 5)
    b = rng.randrange(a + 5, 100, 5)
    prompt = _phrase(rng, [
        "Write a function f(x) that returns '{lo}' if x is below {a}, '{mid}' if x is below "
        "{b}, and '{hi}' otherwise.",
        "Classify a number x: '{lo}' when x < {a}, '{mid}' when x < {b}, else '{hi}'. "
        "Implement f(x).",
        "Implement f(x) returning '{hi}' for x of at least {b}, '{mid}' for x of at least "
        "{a}, and '{lo}' for anything smaller.",
    ], lo=lo, mid=mid, hi=hi, a=a, b=b)
    code = (f"def f(x):\n    if x < {a}:\n        return '{lo}'\n    elif x < {b}:\n"
            f"        return '{mid}'\n    else:\n        return '{hi}'\n")
    xs = [a - 1, a, b - 1, b] + rng.sample(range(0, 101), TESTS_PER_PROBLEM - 4)
    rng.shuffle(xs)
    return Spec("branch", (lo, a, b), prompt,
                [f"If x is below {a}, return '{lo}'.",
                 f"Otherwise, if x is below {b}, return '{mid}'.",
                 f"Otherwise return '{hi}'."], code, [[x] for x in xs])


def _sequence(rng: random.Random) -> Spec:
    start, k, c = rng.randint(0, 9), rng.randint(1, 3), rng.randint(0, 9)
    out = rng.choice(["list", "sum", "last"])
    ret, said = {"list": ("terms", "the list of the first n terms"),
                 "sum": ("sum(terms)", "the sum of the first n terms"),
                 "last": ("terms[-1] if terms else 0", "the n-th term (0 when n is 0)")}[out]
    step = f"t * {k} + {c}" if k > 1 else f"t + {c}"
    prompt = _phrase(rng, [
        "A sequence starts at {s} and each next term is {st} of the previous term t. "
        "Write a function f(n) that returns {said}.",
        "Implement f(n): begin with t = {s}; repeatedly replace t by {st}. Return {said}.",
        "Write f(n) for the sequence whose first term is {s} and whose next term is {st} "
        "(t is the current term); return {said}.",
    ], s=start, st=step, said=said)
    code = (f"def f(n):\n    terms = []\n    t = {start}\n    for _ in range(n):\n"
            f"        terms.append(t)\n        t = {step}\n    return {ret}\n")
    return Spec("sequence", (start, k, c, out), prompt,
                [f"Start with t = {start} and an empty list of terms.",
                 f"Repeat n times: record t, then set t to {step}.",
                 f"Return {said}."], code,
                [[n] for n in rng.sample(range(0, 9), TESTS_PER_PROBLEM)])


def _count(rng: random.Random) -> Spec:
    unit = rng.choice(["char", "word"])
    k = rng.randint(1, 3)
    if unit == "char":
        ignore = "".join(sorted(rng.sample("abcdefghijkl", 2)))
        items, what, skip = "s", "character", f"the characters '{ignore[0]}' and '{ignore[1]}'"
        test = f"if item not in '{ignore}'"
        inputs = ["".join(rng.choice("abcdefghijkl") for _ in range(rng.randint(4, 12)))
                  for _ in range(TESTS_PER_PROBLEM)]
    else:
        ignore = rng.choice(WORDS[:12])
        items, what, skip = "s.split()", "word", f"the word '{ignore}'"
        test = f"if item != '{ignore}'"
        inputs = [" ".join(rng.choice(WORDS[:12]) for _ in range(rng.randint(2, 8)))
                  for _ in range(TESTS_PER_PROBLEM)]
    keep = f" that appear at least {k} times" if k > 1 else ""
    prompt = _phrase(rng, [
        "Write a function f(s) that returns a dictionary counting each {w} of s{keep}, "
        "ignoring {skip}.",
        "Count how often each {w} occurs in the string s, skipping {skip}. Implement f(s) "
        "returning a dict of the {w}s{keep}.",
        "Implement f(s): a dict mapping each {w} in s (except {skip}){keep} to its count.",
        "Given a string s, build a dictionary from each {w} to how many times it occurs, "
        "leaving out {skip}; keep only {w}s{keep_or_all}. Write f(s).",
    ], w=what, keep=keep, skip=skip, keep_or_all=keep or " of any count")
    ret = f"{{k: v for k, v in counts.items() if v >= {k}}}" if k > 1 else "counts"
    code = (f"def f(s):\n    counts = {{}}\n    for item in {items}:\n        {test}:\n"
            f"            counts[item] = counts.get(item, 0) + 1\n    return {ret}\n")
    thoughts = [f"Count each {what} of s in a dictionary, skipping {skip}."]
    if k > 1:
        thoughts.append(f"Keep only the {what}s counted at least {k} times.")
    return Spec("count", (unit, ignore, k), prompt, thoughts, code, [[s] for s in inputs])


FAMILIES: dict[str, Callable[[random.Random], Spec]] = {
    "arith": _arith, "string": _string, "filter": _filter, "branch": _branch,
    "sequence": _sequence, "count": _count,
}


# ----------------------------------------------------------------------------- splits

def split_of(family: str, params: tuple, seed: int) -> str:
    """Which split a parameter combination belongs to (a seeded hash: stable, disjoint)."""
    digest = hashlib.sha256(f"{seed}|{family}|{params!r}".encode()).hexdigest()
    bucket = int(digest[:8], 16) % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def reference_outputs(code: str, inputs: list[list]) -> list:
    """Run the (trusted, generated) reference solution to get each test's expected output."""
    namespace: dict = {}
    exec(compile(code, "<reference>", "exec"), namespace)
    return [namespace["f"](*args) for args in inputs]


def generate(split: str, per_family: int, seed: int = 0,
             families: list[str] | None = None) -> list[tuple[Spec, list]]:
    """``per_family`` distinct problems of each family in ``split``, deterministically."""
    if split not in SPLITS:
        raise SourceError(f"mini split {split!r}: use one of {', '.join(SPLITS)}")
    chosen = families or list(FAMILIES)
    out = []
    for family in chosen:
        if family not in FAMILIES:
            raise SourceError(f"unknown mini family {family!r}; choose from "
                              f"{', '.join(FAMILIES)}")
        rng = random.Random(f"{seed}|{split}|{family}")
        seen: set[str] = set()
        attempts = 0
        while len(seen) < per_family:
            attempts += 1
            if attempts > per_family * 200:
                raise SourceError(f"mini family {family!r} has too few distinct problems in "
                                  f"split {split!r} for {per_family}")
            spec = FAMILIES[family](rng)
            if split_of(family, spec.params, seed) != split or spec.prompt in seen:
                continue
            seen.add(spec.prompt)
            out.append((spec, reference_outputs(spec.code, spec.inputs)))
    return out


def to_problem(spec: Spec, outputs: list, split: str, index: int,
               min_tests: int) -> Problem | None:
    tests = split_tests([CallTest(input=i, output=o) for i, o in zip(spec.inputs, outputs,
                                                                    strict=True)], min_tests)
    if tests is None:
        return None
    return Problem(id=f"mini/{split}/{spec.family}/{index}", source="mini", prompt=spec.prompt,
                   kind="function", entry_point="f", tests=tests,
                   meta={"family": spec.family, "split": split,
                         "reference": {"thoughts": spec.thoughts, "program": spec.code}})


def load(min_tests: int = 2, limit: int | None = None, path: str | None = None,
         slice: str | None = "explore", seed: int = 0) -> SourceData:
    """``slice`` names the split; ``limit`` is the number of problems *per family*."""
    if path:
        raise SourceError("source 'mini' is generated, it takes no path")
    split = slice or "explore"
    data = SourceData()
    for index, (spec, outputs) in enumerate(generate(split, limit or 50, seed)):
        problem = to_problem(spec, outputs, split, index, min_tests)
        if problem is None:
            data.dropped += 1
        else:
            data.problems.append(problem)
    return data


def first_per_family(problems: list[Problem], limit: int | None,
                     group: Callable[[Problem], str] | None = None) -> list[Problem]:
    """The first ``limit`` problems of each family (or of each ``group``, e.g. a benchmark's
    slice), in order (all when ``limit`` is None)."""
    if limit is None:
        return problems
    counts: dict[str, int] = {}
    kept = []
    for p in problems:
        family = group(p) if group else p.meta.get("family", p.source)
        if counts.get(family, 0) < limit:
            counts[family] = counts.get(family, 0) + 1
            kept.append(p)
    return kept
