from __future__ import annotations

import os
import sys
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


GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}


def git(*args: str, cwd: Path) -> str:
    import subprocess

    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout


def make_project_copy(dest: Path) -> Path:
    """The project's files (tracked or not ignored) as a fresh git repo, no outputs."""
    import shutil

    for rel in git("ls-files", "--cached", "--others", "--exclude-standard",
                   cwd=ROOT).splitlines():
        src = ROOT / rel
        if src.is_file() and not rel.startswith("data/"):  # outputs are regenerated
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    git("init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-qm", "copy", cwd=dest)
    return dest


SMALL = {"pretrain": 60, "explore": 10, "test": 10}  # mini problems per family
CI_EXPLORE = {"limit": 12, "search": {"rollouts": 2, "max_programs": 6}}


def use_ci_profile(root: Path) -> None:
    """The mini profile at test size: small pools, the ci pretraining setting."""
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    for pool, limit in SMALL.items():
        params["problems"][pool][0]["limit"] = limit
    params["pretrain"]["setting"] = "ci"
    params["explore"]["limit"] = CI_EXPLORE["limit"]
    params["explore"]["search"].update(CI_EXPLORE["search"])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git("commit", "-qam", "ci profile", cwd=root)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A throwaway copy of the project at test size; commands run there keep their state
    there."""
    root = make_project_copy(tmp_path / "project")
    use_ci_profile(root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("BDC_PROJECT", str(root))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "HF_HOME"):
        monkeypatch.delenv(key, raising=False)
    return root
