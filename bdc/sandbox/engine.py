"""Host side of the sandbox: warm isolated workers in, trustworthy test outcomes out.

The host keeps every expected output. A worker (see ``worker.py``) hands the host prepared
program processes; the host sends each one only its program and call arguments (function
tests) or stdin (stdio tests), reads plain data back, and compares here. Assertion snippets
(``{"code": ...}`` tests) run here too, against proxies whose every call runs in the sandbox,
so a program never sees the values it is compared with. The host also supervises: deadlines,
output caps, and kills through a pidfd.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import queue
import select
import shutil
import signal
import socket
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
from bdc.errors import BDCError
from bdc.problems.format import CallTest, CodeTest, StdioTest, Test
from bdc.sandbox import protocol

log = logging.getLogger(__name__)

# The worker is imported rather than run as a script so that it starts from its bytecode
# cache when there is one (a script is compiled at every start: 3 ms of each worker's).
WORKER_DIR = str(Path(__file__).parent)
WORKER_BOOT = f"import sys; sys.path[0] = {WORKER_DIR!r}; import worker; worker.main()"
STDERR_TAIL = 4096
Status = Literal["passed", "failed", "error", "timeout"]
FEATURES = {
    "private_filesystem": "private read-only filesystem view (host files hidden)",
    "network_namespace": "no network",
    "pid_namespace": "per-run PID namespace (every spawned process dies with the program)",
    "unprivileged_uid": "unprivileged user",
    "cgroup": "worker memory and process ceiling (cgroup)",
}
# Imported once in each warm worker so programs' own imports of them cost nothing. Only what
# solutions to programming problems commonly import: each module here lengthens every
# worker's start (dataclasses and hashlib, rare in solutions, would add 7 ms of 50).
PRELOAD = ["array", "bisect", "collections", "copy", "datetime", "decimal", "fractions",
           "functools", "heapq", "itertools", "json", "math", "operator", "random", "re",
           "statistics", "string", "typing"]
ALWAYS = ("scrubbed environment, scratch working directory, rlimits (memory, CPU, processes, "
          "file size, open files), wall-clock timeouts, output cap, comparison outside the "
          "program's process")


class IsolationError(BDCError, RuntimeError):
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


# --------------------------------------------------------------------------- isolation report

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


# --------------------------------------------------------------------------- workers

class WorkerProcess:
    """One warm zygote inside the isolation, reached over a Unix socket."""

    def __init__(self, settings: SandboxSettings, index: int, scratch: Path, uid: int) -> None:
        self.settings, self.index, self.scratch, self.uid = settings, index, scratch, uid
        self.proc: subprocess.Popen | None = None
        self.features: dict = {}

    def start(self) -> None:
        s = self.settings
        self.newroot = tempfile.mkdtemp(prefix="root-", dir=self.scratch)
        os.chmod(self.newroot, 0o755)
        tag = f"{os.getpid()}-{self.index}-{time.monotonic_ns() % 10**6}"
        cfg = {
            "isolate": s.isolate, "newroot": self.newroot, "uid": self.uid,
            "memory_mb": s.memory_mb, "nproc": s.nproc, "file_mb": s.file_mb,
            "nofile": s.nofile, "tmp_mb": s.tmp_mb, "preload": PRELOAD,
        }
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": str(self.scratch)}
        self.proc = subprocess.Popen(
            [sys.executable, "-E", "-s", "-S", "-B", "-c", WORKER_BOOT, str(theirs.fileno()),
             json.dumps(cfg)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, cwd="/", pass_fds=[theirs.fileno()], start_new_session=True)
        theirs.close()
        features: dict = {}
        if s.cgroup and os.geteuid() == 0:
            try:
                features["cgroup"] = _place_in_cgroup(self.proc.pid, f"bdc-sandbox-{tag}",
                                                      s.worker_memory_mb, s.worker_pids)
            except OSError as exc:
                features.update(cgroup=False, cgroup_error=str(exc))
        hello = self._request({"features": features}, timeout=30.0)
        if hello.get("error"):
            raise IsolationError(f"sandbox worker failed to start: {hello['error']}")
        self.features = hello["features"]
        _check_isolation(self.features, self.settings.strict)

    def _request(self, message: dict | None, timeout: float, fds: int = 0):
        self.sock.settimeout(timeout)
        try:
            if message is not None:
                self.sock.send(json.dumps(message).encode())
            data, got, _, _ = socket.recv_fds(self.sock, 1 << 16, fds)
        except (OSError, TimeoutError) as exc:
            raise WorkerLost(f"worker {self.index} did not answer: {exc}") from exc
        if not data:
            raise WorkerLost(f"worker {self.index} exited")
        reply = json.loads(data)
        return (reply, got) if fds else reply

    def spawn(self, patience: float) -> tuple[int, list[int]]:
        """A prepared program process: its pid and the host's ends of its pipes + pidfd."""
        reply, fds = self._request({"op": "spawn", "patience": patience},
                                   timeout=patience + 10.0, fds=5)
        if reply.get("error"):
            for fd in fds:
                os.close(fd)
            raise WorkerLost(reply["error"])
        return reply["pid"], fds

    def exit_code(self, pid: int) -> int | None:
        return self._request({"op": "status", "pid": pid}, timeout=10.0).get("exit_code")

    def hang_up(self) -> None:
        """End of input: the worker kills and reaps what it started, then exits."""
        if self.proc is not None:
            self.sock.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.hang_up()
        pidfd = os.pidfd_open(self.proc.pid)  # woken by the exit itself, not by polling
        try:
            exited, _, _ = select.select([pidfd], [], [], 2.0)
        finally:
            os.close(pidfd)
        if not exited:
            self.proc.kill()
        self.proc.wait()
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


def _place_in_cgroup(pid: int, name: str, memory_mb: int, pids: int) -> str:
    """Put a worker (and so every program it runs) under a memory and process ceiling.

    Done here while the worker is still importing: moving a process between cgroups waits
    for an RCU grace period (~10 ms per hierarchy on cgroup v1), which the worker would
    otherwise sit out before it can isolate itself. The folders, comma-separated."""
    own = {}
    with open("/proc/self/cgroup") as f:  # the worker was forked from here: same cgroups
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(","):
                own[c] = path
    root = "/sys/fs/cgroup"
    if os.path.exists(f"{root}/cgroup.controllers"):  # cgroup v2: one hierarchy
        layout = [(f"{root}{own['']}", (("memory.max", memory_mb << 20), ("pids.max", pids)))]
    else:
        layout = [(f"{root}/memory{own.get('memory', '/')}",
                   (("memory.limit_in_bytes", memory_mb << 20),)),
                  (f"{root}/pids{own.get('pids', '/')}", (("pids.max", pids),))]
    dirs = []
    for parent, knobs in layout:
        d = f"{parent}/{name}".replace("//", "/")
        os.makedirs(d, exist_ok=True)
        dirs.append(d)
        for knob, value in (*knobs, ("cgroup.procs", pid)):
            with open(f"{d}/{knob}", "w") as f:
                f.write(str(value))
    return ",".join(dirs)


def _kill_uid(uid: int) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                os.kill(int(entry), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            continue


# --------------------------------------------------------------------------- one program

class ProgramProcess:
    """One untrusted program process, supervised from the host.

    Function programs are defined once and answer call batches (the first batch goes with
    the program), one reply per call as it returns, so each call keeps its own deadline.
    Stdio programs run once on their stdin. ``ended`` says why the process is gone.
    """

    def __init__(self, worker: WorkerProcess, job: dict, output_bytes: int) -> None:
        self.worker, self.timeout, self.output_bytes = worker, job["timeout"], output_bytes
        self.serving = job["mode"] == "serve"
        self.pid, fds = worker.spawn(patience=self.timeout)
        self.req_w, self.resp_r, self.out_r, self.err_r, self.pidfd = fds
        for fd in (self.resp_r, self.out_r, self.err_r):
            os.set_blocking(fd, False)
        self.replies = protocol.FrameBuffer()
        self.pending: deque = deque()
        self.stdout, self.stdout_bytes, self.stderr = bytearray(), 0, bytearray()
        self.ended: str | None = None
        self.expected = 1 + len(job.get("calls") or []) if self.serving else 0
        self.started = False  # has the program said "ready"
        self.names: list[str] = []
        self.load_error: str | None = None
        self._write(job)
        self.deadline = time.monotonic() + self.timeout

    # ---- plumbing
    def _write(self, obj: dict) -> None:
        try:
            protocol.write_frame(self.req_w, obj)
        except OSError:
            self.ended = self.ended or "exited"

    def _drain(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            if fd == self.err_r:
                self.stderr = (self.stderr + data)[-STDERR_TAIL:]
                continue
            self.stdout_bytes += len(data)
            if not self.serving and len(self.stdout) < self.output_bytes:
                self.stdout += data[: self.output_bytes - len(self.stdout)]
            if self.stdout_bytes > self.output_bytes:
                self.kill("output limit")
                return

    def _read_replies(self) -> None:
        while True:
            try:
                data = os.read(self.resp_r, 1 << 20)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            try:
                self.pending.extend(self.replies.feed(data))
            except protocol.ProtocolError:
                self.kill("protocol violation")
                return

    def _wait(self) -> None:
        """Block until a reply is pending or the process has ended."""
        watched = [self.resp_r, self.out_r, self.err_r, self.pidfd]
        while not self.pending and self.ended is None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.kill("timeout")
                break
            ready, _, _ = select.select(watched, [], [], remaining)
            for fd in ready:
                if fd == self.resp_r:
                    self._read_replies()
                elif fd == self.pidfd:
                    self._drain(self.out_r)
                    self._drain(self.err_r)
                    self._read_replies()
                    self.ended = self.ended or "exited"
                else:
                    self._drain(fd)

    def kill(self, reason: str) -> None:
        if self.ended is None or self.ended == "exited":
            self.ended = reason
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        if not self.worker.features.get("pid_namespace"):
            # without a PID namespace, its process group is the best we can do
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        if self.ended is None:
            self.kill("closed")
        for fd in (self.req_w, self.resp_r, self.out_r, self.err_r, self.pidfd):
            os.close(fd)

    # ---- protocol: the host, not the program, decides what each reply means
    def _next_reply(self) -> dict | None:
        self._wait()
        if not self.pending:
            return None
        frame = self.pending.popleft()
        if self.expected <= 0 or type(frame) is not dict:
            self.kill("protocol violation")
            return None
        self.expected -= 1
        self.deadline = time.monotonic() + self.timeout
        return frame

    def ready(self) -> bool:
        """Wait for the program to be defined; False (with ``load_error``) if it was not."""
        frame = self._next_reply()
        if frame is None:
            self.load_error = self.describe_end()
            return False
        self.started = True
        error, names = frame.get("error"), frame.get("names")
        if error is not None:
            self.load_error = str(error)[:2000]
            self.kill("load error")
            return False
        if not (type(names) is list and all(type(n) is str for n in names)):
            self.kill("protocol violation")
            self.load_error = "protocol violation"
            return False
        self.names = names
        return True

    def submit(self, calls: list[tuple[str, list]]) -> None:
        if calls and self.ended is None:
            self.expected += len(calls)
            self.deadline = time.monotonic() + self.timeout
            self._write({"calls": [[n, protocol.encode(a)] for n, a in calls]})

    def results(self, n: int) -> list[CallResult]:
        """Replies to the next ``n`` calls; shorter if the program ended on the last one."""
        out: list[CallResult] = []
        while len(out) < n:
            frame = self._next_reply()
            if frame is None:
                status = "timeout" if self.ended == "timeout" else "error"
                out.append(CallResult(status, detail=self.describe_end()))
                break
            out.append(_call_result(frame))
        return out

    def call(self, name: str, args: list) -> object:
        """``name(*args)`` in the program; raises CallFailed unless it returned data."""
        if self.ended is not None:
            raise CallFailed("error", "the program process has ended")
        self.submit([(name, args)])
        (result,) = self.results(1)
        if result.status != "ok":
            raise CallFailed(result.status, result.detail)
        return result.value

    def run_to_exit(self) -> int | None:
        """Stdio: wait for the program to finish; its exit code, or None if it was killed."""
        self._wait()
        if self.ended == "exited":
            self._drain(self.out_r)
            return self.worker.exit_code(self.pid)
        return None

    def describe_end(self) -> str:
        text = {"timeout": "time limit exceeded", "output limit": "output limit exceeded",
                "exited": "program exited", "protocol violation": "protocol violation"
                }.get(self.ended or "", self.ended or "ended")
        tail = self.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        return text + (": " + " | ".join(tail) if tail else "")


@dataclass
class CallResult:
    status: Literal["ok", "error", "timeout"]
    value: object = None
    detail: str = ""


def _call_result(frame: dict) -> CallResult:
    if frame.get("error") is not None:
        return CallResult("error", detail=str(frame["error"])[:2000])
    try:
        return CallResult("ok", value=protocol.decode(frame.get("value")))
    except protocol.ProtocolError as exc:
        return CallResult("error", detail=f"malformed return value: {exc}")


class CallFailed(Exception):
    def __init__(self, status: Status, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


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


def _leading_calls(tests: deque[Test]) -> list[CallTest]:
    batch = []
    for test in tests:
        if not isinstance(test, CallTest):
            break
        batch.append(test)
    return batch


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
            _warn_isolation(worker.features)
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
                           detail=f"expected {_short(test.output)}, got {_short(stdout)}")

    def _run_function(self, worker: WorkerProcess, execution: Execution, timeout: float,
                      outcomes: list[TestOutcome]) -> None:
        entry = execution.entry_point
        pending: deque[Test] = deque(execution.tests)
        if any(isinstance(t, StdioTest) for t in pending):
            raise ValueError("stdin/stdout tests on a function problem")
        while pending:
            batch = _leading_calls(pending)
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
                        outcomes.append(_judge_call(test, result))
                        pending.popleft()
                    if proc.ended is None and pending and isinstance(pending[0], CodeTest):
                        outcomes.append(_judge_code(proc, pending.popleft(), entry))
                    batch = _leading_calls(pending) if proc.ended is None else []
                    proc.submit([(entry, t.input) for t in batch])
            finally:
                proc.close()
