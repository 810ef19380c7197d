"""The tables Great Expectations validates, built from the explore outputs and the pools.

Four tables, one row per item, each with a ``problem_id`` so a failed expectation can name
the offending problems:

- ``sft``: the SFT records, with derived columns: does the program parse, how many thoughts
  and how long, does the tree agree that this answer passed every hidden test, is the record
  an exact or near duplicate of another, how much of a test problem it overlaps (n-grams),
  does it contain a hidden test's expected output;
- ``prefs``: the preference pairs;
- ``trees``: a per-problem summary of the tree files;
- ``problems``: both pools, with a content hash (disjoint by content, not only by id).

Hidden tests are read here, for checking only: validation trains nothing and searches
nothing.

Before any table is built, every line and tree file is read against a loose schema
(:class:`SftLine`, :class:`PrefLine`, :class:`TreeFile`): a field may be missing or null
(an expectation says so, with the problems at fault), but one of the wrong type, a line that
is not a JSON object, or a truncated tree file is a :class:`~bdc.jsonl.RecordError` naming
the file, the line and the field, since no table can be built from it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from bdc import artifacts
from bdc.jsonl import RecordError, describe_invalid, read_jsonl
from bdc.llm.prompts import parses
from bdc.problems.format import CallTest, Problem, StdioTest, read_problems

_WORD = re.compile(r"\w+")


def normalise(text: str) -> str:
    """Lower case, single spaces: what "the same content" means here."""
    return " ".join(text.lower().split())


def content_hash(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()[:16]


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def record_text(row: dict) -> str:
    return "\n".join([*(row.get("thoughts") or []), row.get("program") or ""])


# ----------------------------------------------------------------------------- similarity

def near_duplicates(texts: list[str], n: int, threshold: float) -> list[int | None]:
    """For each text, the index of an earlier text whose word n-grams it shares above
    ``threshold`` (cosine of binary n-gram vectors, scikit-learn), else None."""
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.preprocessing import normalize

    if not texts:
        return []
    vectors = HashingVectorizer(analyzer="word", ngram_range=(n, n), binary=True,
                                norm=None, alternate_sign=False, token_pattern=r"\w+|[^\w\s]",
                                lowercase=True).transform(texts)
    vectors = normalize(vectors)
    out: list[int | None] = []
    for i in range(len(texts)):
        if i == 0:
            out.append(None)
            continue
        sims = (vectors[:i] @ vectors[i].T).toarray().ravel()
        j = int(np.argmax(sims))
        out.append(j if sims[j] >= threshold else None)
    return out


def overlap_with(pool: list[Problem], n: int) -> dict[str, set]:
    return {p.id: ngrams(p.prompt, n) for p in pool}


def max_overlap(text: str, test_grams: dict[str, set], n: int) -> tuple[float, str | None]:
    """The largest share of a test problem's n-grams found in ``text``, and that problem."""
    mine = ngrams(text, n)
    best, which = 0.0, None
    for pid, grams in test_grams.items():
        if grams:
            share = len(grams & mine) / len(grams)
            if share > best:
                best, which = share, pid
    return best, which


def expected_texts(problem: Problem, min_chars: int) -> list[str]:
    """The hidden tests' expected outputs as text, where long enough to mean something
    (``4`` appears in any program; ``'stonecloudapple'`` does not by chance)."""
    out = []
    for test in problem.tests.hidden:
        if isinstance(test, StdioTest):
            text = test.output.strip()
        elif isinstance(test, CallTest):
            text = test.output if isinstance(test.output, str) else json.dumps(test.output)
        else:
            continue
        if len(text) >= min_chars:
            out.append(text)
    return out


# ----------------------------------------------------------------------------- tables

class _Loose(BaseModel):
    """Types only: missing and null fields pass (the expectations judge those), extra
    fields are kept, numbers are not read from strings."""

    model_config = ConfigDict(extra="allow", strict=True)


class SftLine(_Loose):
    problem_id: str | None = None
    task: str | None = None
    prompt: str | None = None
    thoughts: list[str] | None = None
    program: str | None = None
    public_pass_rate: float | None = None
    hidden_pass_rate: float | None = None


class PrefLine(_Loose):
    problem_id: str | None = None
    prompt: str | None = None
    thoughts: list[str] | None = None
    chosen: str | None = None
    rejected: str | None = None
    chosen_value: float | None = None
    rejected_value: float | None = None


class _Answer(_Loose):
    thoughts: list[str] | None = None
    program: str | None = None
    public_pass_rate: float | None = None
    hidden: dict | None = None


class _Search(_Loose):
    nodes: list | None = None
    programs: int | None = None
    tokens: int | None = None


class TreeFile(_Loose):
    problem_id: str
    solved_hidden: bool | None = None
    answer: _Answer | None = None
    tree: _Search | None = None
    error: dict | None = None


def checked(schema: type[BaseModel]):
    """A :func:`read_jsonl` parser: the line as it is, once ``schema`` accepts its types."""
    def parse(obj: dict) -> dict:
        schema.model_validate(obj)
        return obj
    return parse


def read_trees(trees_dir: Path) -> dict[str, dict]:
    records = {}
    for path in sorted(trees_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecordError(f"{path}: not a whole JSON file (truncated?): {exc}") from exc
        if not isinstance(record, dict):
            raise RecordError(f"{path}: expected a JSON object")
        try:
            TreeFile.model_validate(record)
        except ValidationError as exc:
            raise RecordError(f"{path}: {describe_invalid(exc)}") from exc
        records[record["problem_id"]] = record
    return records


def trees_table(trees: dict[str, dict], explore: list[Problem]) -> pd.DataFrame:
    rows = []
    for p in explore:
        r = trees.get(p.id)
        answer = (r or {}).get("answer") or {}
        hidden = answer.get("hidden") or {}
        tree = (r or {}).get("tree") or {}
        rows.append({
            "problem_id": p.id, "has_tree": r is not None and "tree" in r,
            "error": ((r or {}).get("error") or {}).get("message"),
            "solved_hidden": bool((r or {}).get("solved_hidden")),
            "public_pass_rate": answer.get("public_pass_rate"),
            "hidden_pass_rate": hidden.get("pass_rate"),
            "nodes": len(tree.get("nodes", [])), "programs": tree.get("programs"),
            "tokens": tree.get("tokens"), "chain_length": len(answer.get("thoughts") or [])})
    return pd.DataFrame(rows)


def sft_table(sft: list[dict], trees: dict[str, dict], explore: dict[str, Problem],
              test: list[Problem], near_n: int, near_threshold: float, contamination_n: int,
              hidden_min_chars: int) -> pd.DataFrame:
    test_grams = overlap_with(test, contamination_n)
    hidden = {p.id: expected_texts(p, hidden_min_chars) for p in [*explore.values(), *test]}
    texts = [normalise(f"{r.get('prompt')}\n{record_text(r)}") for r in sft]
    near: list[int | None] = [None] * len(sft)
    for task in {r.get("task") for r in sft}:  # a P2T and its T2S record share their text
        idx = [i for i, r in enumerate(sft) if r.get("task") == task]
        for i, dup in zip(idx, near_duplicates([texts[i] for i in idx], near_n,
                                               near_threshold), strict=True):
            near[i] = None if dup is None else idx[dup]
    rows = []
    for r, text, dup in zip(sft, texts, near, strict=True):
        tree = trees.get(r.get("problem_id"), {})
        answer = tree.get("answer") or {}
        thoughts = r.get("thoughts") or []
        overlap, test_id = max_overlap(r.get("prompt") or "", test_grams, contamination_n)
        body = record_text(r)
        leaked = [pid for pid, outs in hidden.items() if any(o in body for o in outs)]
        rows.append({
            "problem_id": r.get("problem_id"), "task": r.get("task"),
            "prompt": r.get("prompt"), "program": r.get("program"),
            "public_pass_rate": r.get("public_pass_rate"),
            "hidden_pass_rate": r.get("hidden_pass_rate"),
            "thought_count": len(thoughts),
            "max_thought_chars": max((len(t) for t in thoughts), default=0),
            "program_chars": len(r.get("program") or ""),
            "program_parses": parses(r.get("program") or ""),
            "answer_in_tree": bool(tree.get("solved_hidden")) and
            answer.get("program") == r.get("program") and
            list(answer.get("thoughts") or []) == list(thoughts),
            "text_hash": content_hash(f"{r.get('task')}\n{text}"), "near_duplicate_of":
            None if dup is None else sft[dup].get("problem_id"),
            "test_overlap": round(overlap, 4), "overlapping_test": test_id if overlap else None,
            "hidden_output_in": leaked[0] if leaked else None})
    return pd.DataFrame(rows, columns=SFT_COLUMNS)


SFT_COLUMNS = ["problem_id", "task", "prompt", "program", "public_pass_rate",
               "hidden_pass_rate", "thought_count", "max_thought_chars", "program_chars",
               "program_parses", "answer_in_tree", "text_hash", "near_duplicate_of",
               "test_overlap", "overlapping_test", "hidden_output_in"]


def prefs_table(prefs: list[dict]) -> pd.DataFrame:
    columns = ["problem_id", "chosen", "rejected", "chosen_value", "rejected_value"]
    return pd.DataFrame([{k: p.get(k) for k in columns} for p in prefs], columns=columns)


def problems_table(explore: list[Problem], test: list[Problem]) -> pd.DataFrame:
    rows = [{"problem_id": p.id, "pool": pool, "prompt": p.prompt,
             "content_hash": content_hash(p.prompt), "public_tests": len(p.tests.public),
             "hidden_tests": len(p.tests.hidden)}
            for pool, problems in (("explore", explore), ("test", test)) for p in problems]
    return pd.DataFrame(rows)


def build(explore_dir: Path, problems_dir: Path, settings,
          limit: int | None = None) -> dict[str, pd.DataFrame]:
    """Every table, from an explore output folder and the pools it was explored from
    (``limit``: the first problems explore searched, ``explore.limit``)."""
    explore = read_problems(problems_dir / artifacts.pool("explore"))
    explore = explore[:limit] if limit else explore
    test = read_problems(problems_dir / artifacts.pool("test"))
    trees = read_trees(explore_dir / artifacts.TREES)
    sft = list(read_jsonl(explore_dir / artifacts.SFT, checked(SftLine)))
    prefs = list(read_jsonl(explore_dir / artifacts.PREFS, checked(PrefLine)))
    return {
        "sft": sft_table(sft, trees, {p.id: p for p in explore}, test,
                         settings.near_duplicate_ngram, settings.near_duplicate_threshold,
                         settings.contamination_ngram, settings.hidden_output_min_chars),
        "prefs": prefs_table(prefs),
        "trees": trees_table(trees, explore),
        "problems": problems_table(explore, test),
    }
