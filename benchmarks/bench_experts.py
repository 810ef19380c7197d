"""Training all K + 1 adapters in one process on one loaded base, against the same adapters
trained each in its own process (base loaded K + 1 times), in the same run.

    .venv/bin/python benchmarks/bench_experts.py [--epochs 2]

Uses the pipeline's validated SFT data and clusters (run `dvc repro disentangle` first) and
params.yaml's experts settings, with ``--epochs`` to size the run. Prints both wall times and
their ratio (target: at most 0.6). Where training dominates (many epochs, a tiny base on a
CPU) the ratio tends to 1: what one process saves is the K + 1 loads and start-ups, which
dominate with a large base (an 8B model loads for tens of seconds) and short LoRA runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONE = """
import json, sys
from pathlib import Path
from bdc.runtime import configure_environment
configure_environment()
from bdc.config import ExpertsSettings
from bdc.disentangle.experts import ExpertSet, train_all
settings = ExpertsSettings.model_validate_json(sys.argv[1])
name, data = sys.argv[2], json.loads(Path(sys.argv[3]).read_text())
train_all(ExpertSet(settings.base, settings, settings.template), {name: data},
          Path(sys.argv[4]), Path(sys.argv[5]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=2.0)
    args = ap.parse_args()
    from bdc.runtime import configure_environment

    configure_environment()
    from bdc.config import load_params
    from bdc.disentangle.experts import ExpertSet, datasets, train_all
    from bdc.jsonl import read_jsonl

    params = load_params("params.yaml")
    settings = params.experts.model_copy(update={"epochs": args.epochs,
                                                  "save_steps": 1_000_000})
    data = datasets(list(read_jsonl("data/explore/sft.jsonl", dict)),
                    list(read_jsonl("data/clusters/assignments.jsonl", dict)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import bdc.disentangle.experts"], check=True)
        startup = time.perf_counter() - start
        start = time.perf_counter()
        train_all(ExpertSet(settings.base, settings, settings.template), data, tmp / "one",
                  tmp / "work-one")
        together = time.perf_counter() - start + startup  # one process's start-up, once
        start = time.perf_counter()
        for name, rows in data.items():
            (tmp / f"{name}.json").write_text(json.dumps(rows))
            subprocess.run([sys.executable, "-c", ONE, settings.model_dump_json(), name,
                            str(tmp / f"{name}.json"), str(tmp / "apart"),
                            str(tmp / "work-apart")], check=True)
        apart = time.perf_counter() - start
    print(f"{len(data)} adapters, {args.epochs:g} epochs, {sum(map(len, data.values()))} "
          f"records in all")
    print(f"one process, one base: {together:.1f}s (start-up {startup:.1f}s included)")
    print(f"a process per adapter: {apart:.1f}s")
    print(f"ratio: {together / apart:.2f} (target <= 0.6)")


if __name__ == "__main__":
    main()
