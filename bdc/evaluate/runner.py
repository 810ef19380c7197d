"""Every System-1 solver's programs, generated and scored on the test problems' hidden tests.

Generation is batched by solver: a solver's replicates (one sample per seed) of every test
problem are the rows of the same batches (one adapter per batch, PEFT's ``adapter_names``;
the customized solver and Arrow on their own models): on a CPU one decoding step for 96
rows costs far less than three for 32. The oracle expert's rows are its home expert's.
Each finished batch's programs run in the sandbox while the next batch generates. The table
made of them: :mod:`bdc.evaluate.table`.

Work is kept as it finishes: each chunk (one solver's rows, or one seed's) is written,
scored, to the runner's folder, and a run that finds a chunk there restores it instead of
generating it again. The folder is named by everything that made its chunks (see
``bdc.evaluate.solvers.finished_dirs``), so a killed or failed evaluate resumes where it
stopped, and a changed expert, setting or line of code starts afresh.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bdc.jsonl import atomic_open, read_jsonl, write_jsonl
from bdc.problems.format import Problem, Sample
from bdc.sandbox import Sandbox
from bdc.sandbox.scoring import score_samples

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One program of one solver for one problem under one seed, scored on hidden tests."""

    solver: str
    seed: int
    problem_id: str
    program: str
    thoughts: list[str]
    tokens: int
    seconds: float  # this row's share of its batch's wall time
    pass_rate: float = 0.0
    passed_all: bool = False


def restore_json(path: Path) -> Any:
    """What :func:`keep_json` kept at ``path`` (None: nothing, or unreadable: a warning names
    the file, and the caller computes it again)."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("evaluate: %s cannot be read (%s): computing it again", path, exc)
        return None
    log.info("evaluate: %s reused (finished by an earlier run)", path.name)
    return value


def keep_json(path: Path, value: Any) -> None:
    with atomic_open(path) as f:
        json.dump(value, f)


@dataclass
class Runner:
    """Generates batches and scores each in the sandbox while the next one generates; keeps
    each finished chunk in ``folder`` (None: keeps nothing) and restores it from there."""

    problems: dict[str, Problem]
    sandbox: Sandbox
    folder: Path | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    _pending: list[Future] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(1)

    def _score(self, rows: list[Outcome]) -> None:
        samples = [Sample(problem_id=r.problem_id, program=r.program) for r in rows]
        for row, score in zip(rows, score_samples(self.problems, samples, self.sandbox,
                                                  "hidden"), strict=True):
            row.pass_rate, row.passed_all = score.pass_rate, score.status == "passed"

    def _chunk(self, chunk: str) -> Path | None:
        return self.folder / f"{chunk}.jsonl" if self.folder else None

    def finished(self, chunk: str) -> bool:
        path = self._chunk(chunk)
        return path is not None and path.exists()

    def _restore(self, chunk: str, labels: list[tuple[str, str, int]]
                 ) -> list[Outcome] | None:
        """The chunk's rows as an earlier run kept them; None (with a warning naming the
        file) when they cannot be read or are not this chunk's rows."""
        path = self._chunk(chunk)
        try:
            rows = list(read_jsonl(path, lambda o: Outcome(**o)))
        except ValueError as exc:
            log.warning("evaluate: %s cannot be read (%s): generating it again", path, exc)
            return None
        if [(o.solver, o.problem_id, o.seed) for o in rows] != labels:
            log.warning("evaluate: %s does not hold this chunk's rows: generating it again",
                        path)
            return None
        return rows

    def _keep(self, chunk: str, rows: list[Outcome], scored: list[Future]) -> None:
        for future in scored:  # the chunk's scoring ran before this (one worker, in order)
            future.result()   # and a failed one keeps the chunk from looking finished
        write_jsonl(self._chunk(chunk), [asdict(r) for r in rows])

    def generate(self, labels: list[tuple[str, str, int]], run: Callable[[Callable], None],
                 chunk: str, load: Callable[[], object] | None = None) -> None:
        """``labels``: (solver, problem id, seed) per row; ``run(on_batch)`` generates them in
        order, calling ``on_batch(start, results, tokens)`` per batch. A ``chunk`` a run
        already finished is restored instead (neither ``load`` nor ``run`` is called).
        ``load()`` readies the model first, outside the clock: the seconds per solver are
        generation's alone, whichever chunks a resumed run restored."""
        restored = self._restore(chunk, labels) if self.finished(chunk) else None
        if restored is not None:
            self.outcomes += restored
            self.reused.append(chunk)
            log.info("evaluate: %s reused (finished by an earlier run)", chunk)
            return
        if load is not None:
            load()
        clock = [time.perf_counter()]
        mine: list[Outcome] = []
        scored: list[Future] = []

        def on_batch(start: int, results: list, tokens: list[int]) -> None:
            now = time.perf_counter()
            elapsed, clock[0] = now - clock[0], now
            total = max(sum(tokens), 1)
            rows = [Outcome(solver, seed, pid, program, thoughts, n, elapsed * n / total)
                    for (solver, pid, seed), (thoughts, program), n in
                    zip(labels[start:start + len(results)], results, tokens, strict=True)]
            mine.extend(rows)
            scored.append(self._pool.submit(self._score, rows))

        try:
            run(on_batch)
        except BaseException:
            # what finished before the failure is kept, not lost with it; and no scoring
            # of this chunk outlives the sandbox the caller closes next
            self._settle(scored)
            raise
        self.outcomes += mine
        self._pending += scored
        if self.folder is not None:
            self._pending.append(self._pool.submit(self._keep, chunk, mine, scored))

    def _settle(self, scored: list[Future]) -> None:
        for future in [*self._pending, *scored]:
            if not future.done():
                future.exception()  # waits; the failure being raised is the one to report
        self._pool.shutdown()

    def finish(self) -> list[Outcome]:
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pool.shutdown(cancel_futures=True)
        return self.outcomes
