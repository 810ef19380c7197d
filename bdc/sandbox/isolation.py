"""Which isolation features this machine enforces, what is always enforced, and the
measures taken as root: a cgroup per worker, a uid whose processes can all be killed."""

from __future__ import annotations

import json
import logging
import os
import signal

from bdc.errors import BDCError

log = logging.getLogger(__name__)

FEATURES = {
    "private_filesystem": "private read-only filesystem view (host files hidden)",
    "network_namespace": "no network",
    "pid_namespace": "per-run PID namespace (every spawned process dies with the program)",
    "unprivileged_uid": "unprivileged user",
    "cgroup": "worker memory and process ceiling (cgroup)",
}
ALWAYS = ("scrubbed environment, scratch working directory, rlimits (memory, CPU, processes, "
          "file size, open files), wall-clock timeouts, output cap, comparison outside the "
          "program's process")



class IsolationError(BDCError, RuntimeError):
    """Strict isolation was requested and this machine cannot provide it."""


def missing_isolation(features: dict) -> list[str]:
    return [desc for key, desc in FEATURES.items() if not features.get(key)]


def check_isolation(features: dict, strict: bool) -> None:
    missing = missing_isolation(features)
    if missing and strict:
        raise IsolationError(
            "sandbox isolation unavailable: " + "; ".join(missing)
            + f" (details: {json.dumps({k: v for k, v in features.items() if 'error' in k})})")


def warn_isolation(features: dict) -> None:
    missing = missing_isolation(features)
    if missing:
        log.warning("SANDBOX ISOLATION REDUCED on this machine. Not available: %s. "
                    "Still enforced: %s. Set sandbox.strict: true to refuse to run instead.",
                    "; ".join(missing), ALWAYS)


def place_in_cgroup(pid: int, name: str, memory_mb: int, pids: int) -> str:
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


def kill_uid(uid: int) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                os.kill(int(entry), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            continue
