from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Keep every test's runtime state (temp files, caches, stores) inside the project."""
    from bdc.runtime import configure_environment

    configure_environment(ROOT)
    tempfile.tempdir = None  # re-read TMPDIR


@pytest.fixture(scope="session")
def humaneval_data():
    from bdc.problems.sources import load_source

    return load_source("humaneval", min_tests=1)


def processes_of_uid(uid: int, live_only: bool = False) -> list[int]:
    """PIDs owned by ``uid`` (real uid), read from /proc; ``live_only`` skips zombies."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if live_only and line.startswith("State:") and "Z" in line.split()[1]:
                        break
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except OSError:
            continue
    return pids
