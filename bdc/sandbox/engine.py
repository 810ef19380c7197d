"""The host's sandbox: a pool of warm isolated workers, one program at a time on each, and
trustworthy test outcomes out.

The host keeps every expected output. A worker (``worker.py``, supervised through
``worker_process``) hands the host prepared program processes; the host sends each one only
its program and call arguments (function tests) or stdin (stdio tests) through ``program``,
and compares what comes back outside the program (``judging``), assertion snippets included,
run against proxies whose every call runs in the sandbox. Deadlines, output caps and kills
through a pidfd are ``program``'s; what this machine isolates is ``isolation``'s.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bdc.config import SandboxSettings
from bdc.problems.format import CodeTest, StdioTest, Test
from bdc.sandbox import protocol
from bdc.sandbox.isolation import warn_isolation
from bdc.sandbox.judging import judge_call, judge_code, leading_calls, outputs_match, short
from bdc.sandbox.program import ProgramProcess
from bdc.sandbox.results import ExecutionResult, TestOutcome
from bdc.sandbox.worker_process import WorkerLost, WorkerProcess

log = logging.getLogger(__name__)


@dataclass
class Execution:
    """One program and the tests to run it on."""

    program: str
    kind: Literal["function", "stdio"]
    entry_point: str | None
    tests: list[Test]
    key: object = None  # caller's handle, returned with the result


class Sandbox:
    """A pool of warm isolated workers. Thread-safe; use as a context manager."""

    def __init__(self, settings: SandboxSettings, scratch: Path | None = None) -> None:
        self.settings = settings
        self._own_scratch = scratch is None
        self.scratch = Path(tempfile.mkdtemp(prefix="bdc-sandbox-")) if scratch is None \
            else scratch
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._idle: queue.Queue[WorkerProcess | None] = queue.Queue()  # None: a start failed
        self._all: list[WorkerProcess] = []
        self._lock = threading.Lock()
        self._warned = False  # reduced isolation is reported once per sandbox
        self._starting: list[threading.Thread] = []
        # Each sandbox's workers get uids of their own: separate process limits, and
        # cleanup by uid can never touch anything else (os.urandom: the secrets module
        # would load OpenSSL, 5 ms of every start-up).
        self._uid_block = settings.uid_base + int.from_bytes(os.urandom(4)) % (1 << 20) * 64

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def start(self) -> None:
        """Start every worker at once in the background, so that the first programs find
        them warm while the caller is still reading its inputs."""
        for _ in range(self.settings.workers - len(self._all)):
            thread = threading.Thread(target=self._warm, daemon=True)
            thread.start()
            self._starting.append(thread)

    def _warm(self) -> None:
        try:
            worker = self._checkout()
        except BaseException:  # noqa: BLE001 - the next real checkout retries and reports
            self._idle.put(None)
            return
        self._idle.put(worker)

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def features(self) -> dict:
        worker = self._checkout()
        self._idle.put(worker)
        return dict(worker.features)

    def close(self) -> None:
        for thread in self._starting:
            thread.join()
        self._starting.clear()
        with self._lock:
            for worker in self._all:  # every worker winds down at once, then each is reaped
                worker.hang_up()
            for worker in self._all:
                worker.stop()
            self._all.clear()
        if self._own_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _checkout(self) -> WorkerProcess:
        try:
            worker = self._idle.get_nowait()
            if worker is not None:
                return worker
        except queue.Empty:
            pass
        with self._lock:
            if len(self._all) < self.settings.workers:
                index = len(self._all)
                worker = WorkerProcess(self.settings, index, self.scratch,
                                       self._uid_block + index)
                self._all.append(worker)
            else:
                worker = None
        if worker is None:
            # None: a background start failed; start one here and let its error surface
            return self._idle.get() or self._checkout()
        try:
            worker.start()
        except BaseException:
            with self._lock:
                self._all.remove(worker)
            worker.stop()
            raise
        with self._lock:
            warn, self._warned = not self._warned, True
        if warn:
            warn_isolation(worker.features)
        return worker

    def run(self, execution: Execution, timeout: float | None = None) -> ExecutionResult:
        """Run one program on its tests. Timeouts are per test (per call for snippets)."""
        timeout = timeout or self.settings.timeout
        worker = self._checkout()
        outcomes: list[TestOutcome] = []
        try:
            if execution.kind == "stdio":
                for test in execution.tests:
                    outcomes.append(self._run_stdio(worker, execution.program, test, timeout))
            else:
                self._run_function(worker, execution, timeout, outcomes)
        except WorkerLost as exc:
            log.warning("%s; restarting it", exc)
            outcomes += [TestOutcome("error", detail=str(exc))] * (
                len(execution.tests) - len(outcomes))
            worker.stop()
            try:
                worker.start()
            except BaseException:
                with self._lock:  # gone for good: the next checkout starts a fresh one
                    self._all.remove(worker)
                raise
        except BaseException:
            self._idle.put(worker)
            raise
        self._idle.put(worker)
        return ExecutionResult(outcomes)

    def map(self, executions: Iterable[Execution], timeout: float | None = None,
            ) -> Iterator[tuple[Execution, ExecutionResult]]:
        """Run many programs on all workers; results in input order."""
        with ThreadPoolExecutor(self.settings.workers) as pool:
            futures = [(e, pool.submit(self.run, e, timeout)) for e in executions]
            for execution, future in futures:
                yield execution, future.result()

    def _start(self, worker: WorkerProcess, job: dict) -> ProgramProcess:
        return ProgramProcess(worker, job, self.settings.output_bytes)

    def _run_stdio(self, worker: WorkerProcess, program: str, test: Test,
                   timeout: float) -> TestOutcome:
        if not isinstance(test, StdioTest):
            return TestOutcome("error", detail="stdio problems take stdin/stdout tests only")
        proc = self._start(worker, {"mode": "stdio", "program": program, "stdin": test.input,
                                    "timeout": timeout, "cpu_seconds": timeout})
        try:
            exit_code = proc.run_to_exit()
        finally:
            proc.close()
        stdout = proc.stdout.decode("utf-8", "replace")
        if proc.ended == "timeout":
            return TestOutcome("timeout", actual=stdout, detail="time limit exceeded")
        if exit_code != 0:
            return TestOutcome("error", actual=stdout,
                               detail=proc.describe_end() + f" (exit code {exit_code})")
        if outputs_match(stdout, test.output):
            return TestOutcome("passed", actual=stdout)
        return TestOutcome("failed", actual=stdout,
                           detail=f"expected {short(test.output)}, got {short(stdout)}")

    def _run_function(self, worker: WorkerProcess, execution: Execution, timeout: float,
                      outcomes: list[TestOutcome]) -> None:
        entry = execution.entry_point
        pending: deque[Test] = deque(execution.tests)
        if any(isinstance(t, StdioTest) for t in pending):
            raise ValueError("stdin/stdout tests on a function problem")
        while pending:
            batch = leading_calls(pending)
            proc = self._start(worker, {
                "mode": "serve", "program": execution.program, "timeout": timeout,
                "cpu_seconds": timeout * (len(pending) + 1),
                "calls": [[entry, protocol.encode(t.input)] for t in batch]})
            try:
                if not proc.ready():  # the program failed to load: every test fails with it
                    status = "timeout" if proc.ended == "timeout" else "error"
                    outcomes += [TestOutcome(status, detail=proc.load_error)] * len(pending)
                    return
                # A timeout or crash ends the process; the remaining tests get a fresh one.
                while proc.ended is None and pending:
                    for test, result in zip(batch, proc.results(len(batch)), strict=False):
                        outcomes.append(judge_call(test, result))
                        pending.popleft()
                    if proc.ended is None and pending and isinstance(pending[0], CodeTest):
                        outcomes.append(judge_code(proc, pending.popleft(), entry))
                    batch = leading_calls(pending) if proc.ended is None else []
                    proc.submit([(entry, t.input) for t in batch])
            finally:
                proc.close()
