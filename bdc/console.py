"""What the command line shows: rich on a terminal, plain lines everywhere else.

Stages mostly run where their output becomes a log: under DVC, on a Prefect worker, in CI.
There a live progress bar only ever shows its final state, and rich lays log records out for
an 80-column screen, wrapping them mid-sentence. Off a terminal, progress is therefore a
plain line every few seconds, log records are one line each, tables are aligned text, and
rich is not imported at all (a measurable part of every command's start-up).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


def interactive(stream: Any = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


@functools.cache
def _rich_stderr():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def say(text: str) -> None:
    """A message for the person running the command (stderr; stdout carries results)."""
    if interactive():
        _rich_stderr().print(text, markup=False, highlight=False)
    else:
        print(text, file=sys.stderr, flush=True)


def error(text: str) -> None:
    if interactive():
        from rich.markup import escape

        _rich_stderr().print(f"[bold red]error:[/bold red] {escape(text)}")
    else:
        print(f"error: {text}", file=sys.stderr, flush=True)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
          right: Sequence[str] = ()) -> None:
    """A result table on stdout; ``right``: the columns to right-align."""
    if interactive(sys.stdout):
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for c in columns:
            t.add_column(c, justify="right" if c in right else "left")
        for row in rows:
            t.add_row(*row)
        Console().print(t)
        return
    widths = [max(len(str(x)) for x in (c, *(r[i] for r in rows))) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(x).rjust(w) if c in right else str(x).ljust(w)
                         for x, w, c in zip(cells, widths, columns, strict=True)).rstrip()

    print("\n".join([title, line(columns), line(["-" * w for w in widths]),
                     *(line(r) for r in rows)]), flush=True)


NOISY_LOGGERS = ("great_expectations", "sentence_transformers", "httpx", "mlflow",
                 "distributed")


def setup_logging(verbose: bool) -> None:
    if interactive():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=_rich_stderr(), show_path=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt,
                        handlers=[handler])
    if not verbose:  # libraries' own INFO chatter (GX logs every config load) is not ours
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        # PEFT asks transformers 5 for a deprecated attribute whenever it wraps a model:
        # a warning in every stage's log that no user of bdc can act on
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)


@dataclass
class _Task:
    description: str
    total: float | None
    info: str = ""
    completed: float = 0
    started: float = field(default_factory=time.monotonic)
    shown: tuple | None = None  # what the last line said


class PlainProgress:
    """rich's ``Progress`` interface (the part the commands use) as a line every
    ``every`` seconds per task, and a last line for each task at the end."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.tasks: list[_Task] = []
        self.last_line = 0.0

    def add_task(self, description: str, total: float | None = None, info: str = "") -> int:
        self.tasks.append(_Task(description, total, info))
        return len(self.tasks) - 1

    def update(self, task_id: int, completed: float | None = None, advance: float = 0,
               total: float | None = None, info: str | None = None) -> None:
        task = self.tasks[task_id]
        task.completed = (task.completed if completed is None else completed) + advance
        task.total = task.total if total is None else total
        task.info = task.info if info is None else info
        now = time.monotonic()
        if now - self.last_line >= self.every:
            self.last_line = now
            self._show(task)

    def _show(self, task: _Task) -> None:
        state = (task.completed, task.total, task.info)
        if state == task.shown:
            return
        task.shown = state
        total = f"/{_count(task.total)}" if task.total is not None else ""
        info = f" {task.info}" if task.info else ""
        print(f"{task.description}: {_count(task.completed)}{total}{info} "
              f"[{time.monotonic() - task.started:.0f}s]", file=sys.stderr, flush=True)

    def finish(self) -> None:
        for task in self.tasks:
            self._show(task)


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


@contextmanager
def progress() -> Iterator[Any]:
    """A live bar on a terminal, periodic lines elsewhere; same calls either way."""
    if interactive():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                      console=_rich_stderr()) as bar:
            yield bar
        return
    plain = PlainProgress()
    try:
        yield plain
    finally:
        plain.finish()
