"""Host side of the sandbox: warm isolated workers in, trustworthy test outcomes out.

The host keeps every expected output. It sends a worker only a program and call arguments
(function tests) or stdin (stdio tests), receives plain data back, and compares here. Assertion
snippets (``{"code": ...}`` tests) are executed here too, against proxies whose every call runs
inside the sandbox, so a program never sees the values it is compared with.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import queue
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bdc.config import SandboxSettings
from bdc.problems.format import CallTest, CodeTest, StdioTest, Test
from bdc.sandbox import protocol

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("worker.py")
GRACE_S = 5.0  # host watchdog on top of the in-sandbox timeout
Status = Literal["passed", "failed", "error", "timeout"]
FEATURES = {
    "private_filesystem": "private read-only filesystem view (host files hidden)",
    "network_namespace": "no network",
    "pid_namespace": "per-run PID namespace (every spawned process dies with the program)",
    "unprivileged_uid": "unprivileged user",
    "cgroup": "worker memory and process ceiling (cgroup)",
}
# Imported once in each warm worker so programs' own imports of them cost nothing.
PRELOAD = ["array", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal",
           "fractions", "functools", "hashlib", "heapq", "itertools", "json", "math",
           "operator", "random", "re", "statistics", "string", "typing"]
ALWAYS = ("scrubbed environment, scratch working directory, rlimits (memory, CPU, processes, "
          "file size, open files), wall-clock timeouts, output cap, comparison outside the "
          "program's process")


class IsolationError(RuntimeError):
    """Strict isolation was requested and this machine cannot provide it."""


class WorkerLost(RuntimeError):
    """The worker stopped answering or died; it is replaced."""


@dataclass
class TestOutcome:
    status: Status
    actual: object = None  # what the program produced (function return value or stdout)
    detail: str = ""  # error message, timeout or mismatch description


@dataclass
class ExecutionResult:
    """All test outcomes of one program."""

    outcomes: list[TestOutcome] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(o.status == "passed" for o in self.outcomes)

    @property
    def total(self) -> int:
        return len(self.outcomes)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def status(self) -> Status:
        statuses = {o.status for o in self.outcomes}
        if statuses <= {"passed"} and self.outcomes:
            return "passed"
        for s in ("timeout", "error"):
            if s in statuses:
                return s
        return "failed"


# --------------------------------------------------------------------------- workers

def missing_isolation(features: dict) -> list[str]:
    return [desc for key, desc in FEATURES.items() if not features.get(key)]


def _check_isolation(features: dict, strict: bool) -> None:
    missing = missing_isolation(features)
    if missing and strict:
        raise IsolationError(
            "sandbox isolation unavailable: " + "; ".join(missing)
            + f" (details: {json.dumps({k: v for k, v in features.items() if 'error' in k})})")


def _warn_isolation(features: dict) -> None:
    missing = missing_isolation(features)
    if missing:
        log.warning("SANDBOX ISOLATION REDUCED on this machine. Not available: %s. "
                    "Still enforced: %s. Set sandbox.strict: true to refuse to run instead.",
                    "; ".join(missing), ALWAYS)


class WorkerProcess:
    """One warm fork server inside the isolation, and the frames it sends back."""

    def __init__(self, settings: SandboxSettings, index: int, scratch: Path, uid: int) -> None:
        self.settings, self.index, self.scratch, self.uid = settings, index, scratch, uid
        self.proc: subprocess.Popen | None = None
        self.features: dict = {}

    def start(self) -> None:
        s = self.settings
        newroot = tempfile.mkdtemp(prefix="root-", dir=self.scratch)
        os.chmod(newroot, 0o755)
        tag = f"{os.getpid()}-{self.index}-{time.monotonic_ns() % 10**6}"
        cfg = {
            "isolate": s.isolate, "newroot": newroot,
            "uid": self.uid,
            "cgroup": f"bdc-sandbox-{tag}" if s.cgroup else None,
            "worker_memory_mb": s.worker_memory_mb, "worker_pids": s.worker_pids,
            "memory_mb": s.memory_mb, "nproc": s.nproc, "file_mb": s.file_mb,
            "nofile": s.nofile, "output_bytes": s.output_bytes, "tmp_mb": s.tmp_mb,
            "preload": PRELOAD,
        }
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": str(self.scratch)}
        self.newroot = newroot
        self.proc = subprocess.Popen(
            [sys.executable, "-E", "-s", "-S", str(WORKER_SCRIPT), json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, cwd="/", close_fds=True, start_new_session=True)
        self.buffer = protocol.FrameBuffer()
        self.frames: list[dict] = []
        hello = self.recv(30.0)
        if hello.get("error"):
            raise IsolationError(f"sandbox worker failed to start: {hello['error']}")
        self.features = hello["features"]
        _check_isolation(self.features, self.settings.strict)

    def send(self, obj: dict) -> None:
        try:
            self.proc.stdin.write(protocol.pack(obj))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerLost(f"worker {self.index} is gone: {exc}") from exc

    def recv(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while not self.frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerLost(f"worker {self.index} did not answer within {timeout:.1f}s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                data = os.read(fd, 1 << 20)
                if not data:
                    raise WorkerLost(f"worker {self.index} exited")
                self.frames += self.buffer.feed(data)
        return self.frames.pop(0)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:  # end of input: the worker kills and reaps its own program processes
            self.proc.stdin.close()
            self.proc.wait(timeout=2.0)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc = None
        if self.features.get("unprivileged_uid") == self.uid:
            _kill_uid(self.uid)  # anything that outlived its worker (the uid is ours alone)
        for path in str(self.features.get("cgroup") or "").split(","):
            for _ in range(500):  # the kernel empties a cgroup shortly after its last exit
                try:
                    os.rmdir(path) if path else None
                    break
                except OSError:
                    time.sleep(0.002)
        shutil.rmtree(self.newroot, ignore_errors=True)


@dataclass
class CallResult:
    status: Literal["ok", "error", "timeout"]
    value: object = None
    detail: str = ""


def _kill_uid(uid: int) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                os.kill(int(entry), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            continue


class ProgramProcess:
    """A program defined once inside the sandbox, answering calls until it ends.

    Calls go in batches (the first one with the program itself) and come back one reply at a
    time, so a run of call tests costs one round trip while every call keeps its own timeout.
    """

    def __init__(self, worker: WorkerProcess, program: str, timeout: float, budget_calls: int,
                 calls: list[tuple[str, list]], final: bool = False) -> None:
        self.worker, self.timeout = worker, timeout
        self.alive, self.names, self.error = False, [], ""
        self.status: Status = "error"
        worker.send({"mode": "serve", "program": program, "timeout": timeout,
                     "cpu_seconds": timeout * (budget_calls + 1),
                     "calls": [[n, protocol.encode(a)] for n, a in calls], "final": final})
        self.final = final
        event = worker.recv(timeout + GRACE_S)
        if event["event"] == "done":
            self.status = "timeout" if event["reason"] == "timeout" else "error"
            self.error = _describe_end(event)
        elif event.get("error") is not None:
            self.error = event["error"]
            self._wait_done()
        else:
            self.alive, self.names = True, event["names"]

    def submit(self, calls: list[tuple[str, list]], final: bool = False) -> None:
        """Send calls; ``final`` lets the program end right after the last reply."""
        if calls:
            self.final = final
            self.worker.send({"op": "calls", "final": final,
                              "calls": [[n, protocol.encode(a)] for n, a in calls]})

    def results(self, n: int) -> list[CallResult]:
        """Replies to the next ``n`` calls; shorter if the program ended on the last one."""
        out: list[CallResult] = []
        while len(out) < n and self.alive:
            event = self.worker.recv(self.timeout + GRACE_S)
            if event["event"] == "return":
                out.append(_call_result(event))
                if self.final and len(out) == n:
                    self._wait_done()
                    self.alive = False
                continue
            self.alive = False
            out.append(CallResult("timeout" if event.get("reason") == "timeout" else "error",
                                  detail=_describe_end(event)))
        return out

    def call(self, name: str, args: list) -> object:
        """``name(*args)`` in the program; raises CallFailed unless it returned data."""
        if not self.alive:
            raise CallFailed("error", "the program process has ended")
        self.submit([(name, args)])
        (result,) = self.results(1)
        if result.status != "ok":
            raise CallFailed(result.status, result.detail)
        return result.value

    def _wait_done(self) -> None:
        while self.worker.recv(self.timeout + GRACE_S)["event"] != "done":
            pass

    def close(self) -> None:
        if self.alive:
            self.alive = False
            self.worker.send({"op": "end"})
            self._wait_done()


def _call_result(event: dict) -> CallResult:
    if event.get("error") is not None:
        return CallResult("error", detail=str(event["error"]))
    try:
        return CallResult("ok", value=protocol.decode(event["value"]))
    except protocol.ProtocolError as exc:
        return CallResult("error", detail=f"malformed return value: {exc}")


class CallFailed(Exception):
    def __init__(self, status: Status, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _describe_end(event: dict) -> str:
    reason = event.get("reason") or "ended"
    text = {"timeout": "time limit exceeded", "output limit": "output limit exceeded",
            "exited": f"program exited (code {event.get('exit_code')})"}.get(reason, reason)
    tail = (event.get("stderr") or event.get("error") or "").strip().splitlines()[-3:]
    return text + (": " + " | ".join(tail) if tail else "")


# --------------------------------------------------------------------------- judging

def outputs_match(actual: str, expected: str) -> bool:
    """Stdio comparison: line by line, trailing spaces and trailing blank lines ignored."""
    def lines(text: str) -> list[str]:
        out = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
        while out and not out[-1]:
            out.pop()
        return out
    return lines(actual) == lines(expected)


def _as_json_data(value: object) -> object:
    """Tuples become lists: a JSON problem file cannot hold tuples."""
    if type(value) in (list, tuple):
        return [_as_json_data(v) for v in value]
    if type(value) is dict:
        return {k: _as_json_data(v) for k, v in value.items()}
    return value


def _short(value: object, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _judge_call(test: CallTest, result: CallResult) -> TestOutcome:
    if result.status != "ok":
        return TestOutcome(result.status, detail=result.detail)
    if _as_json_data(result.value) == test.output:
        return TestOutcome("passed", actual=result.value)
    return TestOutcome("failed", actual=result.value,
                       detail=f"expected {_short(test.output)}, got {_short(result.value)}")


def _leading_calls(tests: deque[Test]) -> list[CallTest]:
    batch = []
    for test in tests:
        if not isinstance(test, CallTest):
            break
        batch.append(test)
    return batch


def _judge_code(proc: ProgramProcess, test: CodeTest, entry_point: str | None) -> TestOutcome:
    def proxy(name: str) -> Callable:
        return lambda *args: proc.call(name, list(args))

    namespace: dict = {"__builtins__": builtins, "__name__": "__check__"}
    namespace.update({name: proxy(name) for name in proc.names})
    if entry_point:
        namespace["candidate"] = proxy(entry_point)
    try:
        exec(compile(test.code, "<test>", "exec"), namespace)
    except CallFailed as exc:
        return TestOutcome(exc.status, detail=exc.detail)
    except AssertionError as exc:
        return TestOutcome("failed", detail=f"assertion failed {exc}".strip())
    except Exception as exc:  # noqa: BLE001 - the check rejected the program's values
        return TestOutcome("failed", detail=f"{type(exc).__name__}: {exc}")
    return TestOutcome("passed")


# --------------------------------------------------------------------------- the sandbox

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
        self._idle: queue.Queue[WorkerProcess] = queue.Queue()
        self._all: list[WorkerProcess] = []
        self._lock = threading.Lock()
        self._warned = False  # reduced isolation is reported once per sandbox
        # Each sandbox's workers get uids of their own: separate process limits, and
        # cleanup by uid can never touch anything else.
        self._uid_block = settings.uid_base + secrets.randbelow(1 << 20) * 64

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def features(self) -> dict:
        worker = self._checkout()
        self._idle.put(worker)
        return dict(worker.features)

    def close(self) -> None:
        with self._lock:
            for worker in self._all:
                worker.stop()
            self._all.clear()
        if self._own_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _checkout(self) -> WorkerProcess:
        try:
            return self._idle.get_nowait()
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
            return self._idle.get()
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
            _warn_isolation(worker.features)
        return worker

    def _replace(self, worker: WorkerProcess) -> WorkerProcess:
        worker.stop()
        worker.start()
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
            self._replace(worker)
            outcomes += [TestOutcome("timeout", detail=str(exc))] * (
                len(execution.tests) - len(outcomes))
        finally:
            self._idle.put(worker)
        return ExecutionResult(outcomes)

    def map(self, executions: Iterable[Execution], timeout: float | None = None,
            ) -> Iterator[tuple[Execution, ExecutionResult]]:
        """Run many programs on all workers; results in input order."""
        with ThreadPoolExecutor(self.settings.workers) as pool:
            futures = [(e, pool.submit(self.run, e, timeout)) for e in executions]
            for execution, future in futures:
                yield execution, future.result()

    def _run_stdio(self, worker: WorkerProcess, program: str, test: Test,
                   timeout: float) -> TestOutcome:
        if not isinstance(test, StdioTest):
            return TestOutcome("error", detail="stdio problems take stdin/stdout tests only")
        worker.send({"mode": "stdio", "program": program, "stdin": test.input,
                     "timeout": timeout, "cpu_seconds": timeout})
        event = worker.recv(timeout + GRACE_S)
        while event["event"] != "done":
            event = worker.recv(timeout + GRACE_S)
        reason, stdout = event["reason"], event.get("stdout") or ""
        if reason == "timeout":
            return TestOutcome("timeout", actual=stdout, detail="time limit exceeded")
        if reason != "exited" or event.get("exit_code") != 0:
            return TestOutcome("error", actual=stdout, detail=_describe_end(event))
        if outputs_match(stdout, test.output):
            return TestOutcome("passed", actual=stdout)
        return TestOutcome("failed", actual=stdout,
                           detail=f"expected {_short(test.output)}, got {_short(stdout)}")

    def _run_function(self, worker: WorkerProcess, execution: Execution, timeout: float,
                      outcomes: list[TestOutcome]) -> None:
        entry = execution.entry_point
        pending: deque[Test] = deque(execution.tests)
        if any(isinstance(t, StdioTest) for t in pending):
            raise ValueError("stdin/stdout tests on a function problem")
        while pending:
            batch = _leading_calls(pending)
            proc = ProgramProcess(worker, execution.program, timeout, len(pending),
                                  [(entry, t.input) for t in batch],
                                  final=len(batch) == len(pending))
            if not proc.alive:  # the program itself failed to load: every test fails with it
                outcomes += [TestOutcome(proc.status, detail=proc.error)] * len(pending)
                return
            # A timeout or crash ends the process; the remaining tests get a fresh one.
            while proc.alive and pending:
                for test, result in zip(batch, proc.results(len(batch)), strict=False):
                    outcomes.append(_judge_call(test, result))
                    pending.popleft()
                if proc.alive and pending and isinstance(pending[0], CodeTest):
                    outcomes.append(_judge_code(proc, pending.popleft(), entry))
                batch = _leading_calls(pending) if proc.alive else []
                proc.submit([(entry, t.input) for t in batch], final=len(batch) == len(pending))
            proc.close()
