"""No-op `dvc repro` time vs the 3 s target, in a throwaway copy of the project.

Runs the pipeline once, then times a second (no-op) `dvc repro` and, as the baseline measured
in the same run, `dvc --version` (DVC's own start-up cost, which no pipeline can beat).

    .venv/bin/python benchmarks/bench_dvc_noop.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_project_copy

    work = Path(tempfile.mkdtemp(prefix="bench-dvc-"))
    try:
        project = make_project_copy(work / "project")
        env = {**os.environ, "BDC_PROJECT": str(project), "DVC_NO_ANALYTICS": "1",
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        first = timed([DVC, "repro"], project, env)
        noop = statistics.median(timed([DVC, "repro"], project, env)
                                 for _ in range(args.repeat))
        base = statistics.median(timed([DVC, "--version"], project, env)
                                 for _ in range(args.repeat))
        print(f"first dvc repro : {first:6.2f} s")
        print(f"no-op dvc repro : {noop:6.2f} s  (target < 3 s: "
              f"{'met' if noop < 3 else 'NOT met'})")
        print(f"dvc --version   : {base:6.2f} s  (baseline)")
        print(f"no-op / baseline: {noop / base:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
