"""Child processes that lead their own process group (servers, workers, engines): wait for
one to answer over HTTP, and stop the whole group, children included, leaving nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from bdc.errors import BDCError


class ServiceError(BDCError, RuntimeError):
    """A service did not start, or services are already running."""


def group_alive(pgid: int) -> bool:
    """Is any live (non-zombie) process left in process group ``pgid``? (Each service
    leads its own group, so its pid is the group id.)"""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def log_tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host``: a loopback address or ``localhost`` (any other
    name may resolve to an interface others reach)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path,
              headers: dict[str, str] | None = None) -> None:
    """Until ``url`` answers 200 (sent ``headers``: a server's key); fails early, with the
    log's end, if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{url} did not come up: its process exited "
                               f"({proc.returncode}); see {log}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                        timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise ServiceError(f"{url} did not answer within {timeout:.0f}s; see {log}")


def stop_groups(pgids: list[int], grace: float = 15.0) -> None:
    """SIGTERM each group, SIGKILL what is left after ``grace`` seconds, and return only
    when no live process of any group remains."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(group_alive(p) for p in pgids):
        time.sleep(0.2)
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    while any(group_alive(p) for p in pgids):
        time.sleep(0.05)
