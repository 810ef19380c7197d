"""One program process, as the host drives it: calls and stdin in, plain data out,
deadlines, output caps and kills through a pidfd."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from bdc.sandbox import protocol
from bdc.sandbox.results import Status
from bdc.sandbox.worker_process import STDERR_TAIL, WorkerProcess

log = logging.getLogger(__name__)

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
