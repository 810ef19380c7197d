"""Every problem source behind one call, so ``prepare`` and the CLI treat them alike."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from bdc.errors import BDCError
from bdc.problems.format import Problem, Sample

SOURCES = ("mini", "humaneval", "apps", "codecontests", "mbpp", "jsonl")


class SourceError(BDCError, ValueError):
    """A source cannot be read (missing file, unreachable hub, bad slice)."""


@dataclass
class SourceData:
    problems: list[Problem] = field(default_factory=list)
    references: list[Sample] = field(default_factory=list)  # reference solutions, if known
    dropped: int = 0  # problems with too few tests for the split


def load_source(name: str, path: str | None = None, slice: str | None = None,
                limit: int | None = None, min_tests: int = 2, seed: int = 0,
                split: str | None = None) -> SourceData:
    if name not in SOURCES:
        raise SourceError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    module = importlib.import_module(f"bdc.problems.{name}")
    kwargs = {"min_tests": min_tests, "limit": limit, "path": path}
    if slice is not None:
        if name not in ("apps", "codecontests", "humaneval", "mini"):
            raise SourceError(f"source {name!r} has no slices")
        kwargs["slice"] = slice
    if split is not None:
        splits = {"apps": ("train", "test"), "codecontests": ("train", "valid", "test")}
        if split not in splits.get(name, ()):
            raise SourceError(f"source {name!r} has no split {split!r}"
                              + (f"; choose {' or '.join(splits[name])}" if name in splits
                                 else ""))
        kwargs["split"] = split
    if name == "mini":
        kwargs["seed"] = seed
    return module.load(**kwargs)


def read_rows(path: Path) -> list[dict]:
    """Rows of a native dataset file (JSON list, JSON Lines or Parquet), each tagged with
    ``_where`` (file and line or row) for error messages."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [{**r, "_where": f"{path} row {i}"}
                for i, r in enumerate(pq.read_table(path).to_pylist())]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return [{**r, "_where": f"{path} item {i}"} for i, r in enumerate(json.loads(text))]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append({**json.loads(line), "_where": f"{path}:{n}"})
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}:{n}: invalid JSON: {exc.msg}") from exc
    return rows


def local_or_hub(path: str | None, dataset: str, split: str,
                 config: str | None = None) -> list[dict]:
    """Rows from a local native file when ``path`` is given, else from the hub."""
    if not path:
        return hub_rows(dataset, split, config)
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{p}: no such file")
    return read_rows(p)


def parse_range(spec: str | None, what: str, named: dict | None = None,
                ) -> tuple[int, int] | None:
    """``None``/``all`` (everything), a named range, or ``LO-HI`` inclusive."""
    named = named or {}
    if spec in (None, "", "all"):
        return None
    if spec in named:
        return named[spec]
    try:
        lo, hi = (int(x) for x in spec.split("-"))
    except ValueError as exc:
        choices = ", ".join([*named, "all", "LO-HI"])
        raise SourceError(f"{what} slice {spec!r}: use {choices}") from exc
    if lo > hi:
        raise SourceError(f"{what} slice {spec!r}: LO must not exceed HI")
    return lo, hi


def hub_rows(dataset: str, split: str, config: str | None = None) -> list[dict]:
    """Rows from the Hugging Face hub via ``datasets``; a clear error when it is unreachable."""
    import os

    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a declared dependency
        raise SourceError("the `datasets` package is needed to read from the hub") from exc
    offline = "1" in (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for "cannot reach"
        hint = (" (offline mode is on: HF_HUB_OFFLINE=1)" if offline else "")
        raise SourceError(
            f"cannot load {dataset!r} split {split!r} from the Hugging Face hub{hint}: "
            f"{type(exc).__name__}: {exc}. Download it where the hub is reachable and pass "
            "its local path (--path / problems.*.path).") from exc
    return [dict(r) for r in ds]
