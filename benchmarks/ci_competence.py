"""How far the ci models' competence is from their training's stopping point, over seeds and
thread counts: the evidence that the ci setting holds on any CPU of the machine kind.

    .venv/bin/python benchmarks/ci_competence.py [--seeds 0 1 2 3 4] [--threads 1 2]

Each (seed, threads) trains the ci planner, coder and base in its own process (torch's
thread count is fixed per process) on the test suite's ci pools, exactly as the ci setting
of the pretrain stage does (``train_until``: cycles until the skill holds), and also measures
the skill every 100 steps of the first cycle (the base, which needs no skill, is
measured after its one cycle): the step at which it first holds is the
margin the first cycle leaves. Prints one row per model and run, then a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

POOLS = {"pretrain": 200, "explore": 10, "test": 10}  # per family: tests/conftest.py SMALL
PROBES = (200, 300, 400, 500, 600)  # steps of the first cycle at which the skill is measured


def one(seed: int) -> list[dict]:
    """Train the three ci models for ``seed`` in this process; a row per model."""
    import tempfile
    from dataclasses import replace

    import torch

    from bdc.config import Params, PretrainSettings, SandboxSettings
    from bdc.llm.mini_models import CI_SHAPE, ci_competence, corpus_of, effective_spec
    from bdc.llm.pretraining import CompetenceNotReached, measure_skill, mixture, train_until
    from bdc.llm.tiny import new_model
    from bdc.problems import mini
    from bdc.problems.format import read_problems, write_problems
    from bdc.runtime import configure_environment
    from bdc.sandbox import Sandbox
    from bdc.sandbox.scoring import solved

    configure_environment()
    params = Params(seed=seed, pretrain=PretrainSettings(setting="ci"))
    pre = params.pretrain
    folder = Path(tempfile.mkdtemp())
    for name, limit in POOLS.items():
        write_problems(folder / f"{name}.jsonl", mini.load(slice=name, limit=limit,
                                                           seed=0).problems)
    corpus = corpus_of(params, folder)
    required = ci_competence(params, read_problems(folder / "explore.jsonl"))
    rows = []
    with Sandbox(SandboxSettings(workers=2)) as sandbox:
        for index, (name, spec) in enumerate(pre.models.items()):
            model = new_model(CI_SHAPE, corpus.tokenizer, seed=seed + index)

            def measure(m, loss_on=spec.loss_on) -> float:
                return measure_skill(m, corpus.tokenizer, required.problems, loss_on,
                                     pre.max_new_tokens, pre.eval_batch_size,
                                     lambda ps, programs: solved(ps, programs, sandbox))

            probes: dict[int, float] = {}

            def probe(step: int, planned: int, loss: float, m=model, measure=measure,
                      probes=probes) -> None:
                if step + 1 in PROBES:  # the first cycle only (it is longer than the probes)
                    state = torch.get_rng_state()
                    probes[step + 1] = measure(m)  # generation reseeds torch: keep training's
                    torch.set_rng_state(state)
                    m.train()

            mix, _ = effective_spec(params, spec)
            if spec.role != "agent":  # no skill required: one cycle, its skill measured
                competence = replace(required, at_least=0.0, cycles=required.cycles[:1])
            else:
                competence = required
            started = time.perf_counter()
            try:
                losses, checks = train_until(
                    model, corpus.examples, mixture(corpus.examples, mix), competence, measure,
                    pre.batch_size, pre.warmup_steps, pre.min_lr_ratio, False, seed + index,
                    corpus.tokenizer.pad_token_id, probe, spec.loss_on)
                error = None
            except CompetenceNotReached as e:
                losses, checks, error = [], [], str(e)
            rows.append({"seed": seed, "threads": torch.get_num_threads(), "model": name,
                         "probes": probes, "checks": checks, "steps": len(losses),
                         "seconds": round(time.perf_counter() - started, 1), "error": error})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one)))
        return
    rows = []
    print("seed threads model   " + " ".join(f"@{s:<4}" for s in PROBES)
          + " after each cycle (steps: skill)            seconds")
    for threads in args.threads:
        for seed in args.seeds:
            out = subprocess.run([sys.executable, __file__, "--one", str(seed)], check=True,
                                 capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            for row in json.loads(out.stdout.splitlines()[-1]):
                rows.append(row)
                cycles = ", ".join(f"{c['steps']}: {c['skill']:.2f}" for c in row["checks"])
                print(f"{row['seed']:>4} {row['threads']:>7} {row['model']:<7} "
                      + " ".join(f"{row['probes'].get(str(s), row['probes'].get(s, 0)):.2f} "
                                 for s in PROBES)
                      + f" {row['error'] or cycles:<40} {row['seconds']:>7}", flush=True)
    failed = [r for r in rows if r["error"]]
    extra = [r for r in rows if len(r["checks"]) > 1]
    first = {}
    for r in rows:
        if r["checks"]:
            first[r["model"]] = min(first.get(r["model"], 1.0), r["checks"][0]["skill"])
    print(f"\n{len(rows)} models: {len(failed)} never reached the skill, {len(extra)} needed "
          "more than the first cycle; lowest skill at the end of the first cycle: "
          + ", ".join(f"{m} {v:.2f}" for m, v in sorted(first.items())))


if __name__ == "__main__":
    main()
