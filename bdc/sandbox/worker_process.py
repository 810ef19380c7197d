"""Warm worker processes: each a fork server with a stock of pre-spawned program processes,
started isolated and supervised from here."""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bdc.config import SandboxSettings
from bdc.sandbox.isolation import IsolationError, check_isolation, kill_uid, place_in_cgroup

log = logging.getLogger(__name__)

# The worker is imported rather than run as a script so that it starts from its bytecode
# cache when there is one (a script is compiled at every start: 3 ms of each worker's).
WORKER_DIR = str(Path(__file__).parent)
WORKER_BOOT = f"import sys; sys.path[0] = {WORKER_DIR!r}; import worker; worker.main()"
STDERR_TAIL = 4096
# Imported once in each warm worker so programs' own imports of them cost nothing. Only what
# solutions to programming problems commonly import: each module here lengthens every
# worker's start (dataclasses and hashlib, rare in solutions, would add 7 ms of 50).
PRELOAD = ["array", "bisect", "collections", "copy", "datetime", "decimal", "fractions",
           "functools", "heapq", "itertools", "json", "math", "operator", "random", "re",
           "statistics", "string", "typing"]

class WorkerLost(RuntimeError):
    """The worker stopped answering or died; it is replaced."""


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
                features["cgroup"] = place_in_cgroup(self.proc.pid, f"bdc-sandbox-{tag}",
                                                      s.worker_memory_mb, s.worker_pids)
            except OSError as exc:
                features.update(cgroup=False, cgroup_error=str(exc))
        hello = self._request({"features": features}, timeout=30.0)
        if hello.get("error"):
            raise IsolationError(f"sandbox worker failed to start: {hello['error']}")
        self.features = hello["features"]
        check_isolation(self.features, self.settings.strict)

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
            kill_uid(self.uid)  # anything that outlived its worker (the uid is ours alone)
        for path in str(self.features.get("cgroup") or "").split(","):
            for _ in range(500):  # the kernel empties a cgroup shortly after its last exit
                try:
                    os.rmdir(path) if path else None
                    break
                except OSError:
                    time.sleep(0.002)
        shutil.rmtree(self.newroot, ignore_errors=True)
