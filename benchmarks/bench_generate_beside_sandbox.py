"""System-1 generation while the sandbox scores programs, as evaluate runs them: torch on
every core against torch leaving the sandbox's workers their cores, in the same run.

    .venv/bin/python benchmarks/bench_generate_beside_sandbox.py [--model smollm2-135m-instruct]
        [--prompts 6] [--tokens 96] [--repeat 2]

Evaluate scores each batch's programs in the sandbox while the next batches generate. A
real model's program that loops to the time limit (SmolLM2 writes
``max(x for x in range(1000000000) ...)``) keeps a sandbox worker's core busy, and torch's
OpenMP threads wait actively for each other. The sandbox here runs that program on a mini
problem's hidden tests, over and over, on its workers (``sandbox.workers`` of params.yaml);
generation runs on the packaged model (``bdc models prepare NAME`` first) with all cores'
threads and with the cores the workers leave (at least one). Prints
tokens/s for each, beside the busy sandbox and with it idle, and the ratios: what leaving
the cores gains beside the sandbox, and what it costs when the sandbox is idle.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    from bdc.runtime import configure_environment, cpu_cores, project_root

    root = project_root()
    configure_environment(root)
    import torch

    from bdc.config import load_params
    from bdc.llm.loading import load_causal_lm
    from bdc.llm.system1 import solve, template_for
    from bdc.problems import mini
    from bdc.problems.format import Sample
    from bdc.sandbox import Sandbox
    from bdc.sandbox.scoring import score_samples

    settings = load_params(root / "params.yaml").sandbox
    problems = mini.load(slice="test", limit=-(-args.prompts // 6)).problems[:args.prompts]
    prompts = [p.prompt for p in problems]
    spin = Sample(problem_id=problems[0].id, program="def f(*a):\n"
                  "    return max(x for x in range(1000000000) if x % 2 == 0)\n")
    model, tokenizer = load_causal_lm(args.model)
    template = template_for(tokenizer)
    all_cores, left = cpu_cores(), max(1, cpu_cores() - settings.workers)

    def tokens_per_s(threads: int) -> float:
        torch.set_num_threads(threads)
        counted: list[int] = []
        start = time.perf_counter()
        solve(model, tokenizer, template, prompts, args.tokens, len(prompts),
              on_batch=lambda _, results, tokens: counted.extend(tokens))
        return sum(counted) / (time.perf_counter() - start)

    solve(model, tokenizer, template, prompts[:1], 8, 1)  # warm-up
    runs: dict[tuple[str, int], list[float]] = {}
    with Sandbox(settings) as sandbox:
        stop = threading.Event()

        def busy() -> None:
            while not stop.is_set():
                list(score_samples({p.id: p for p in problems}, [spin] * settings.workers,
                                   sandbox, "hidden"))

        for _ in range(args.repeat):  # interleaved, so that machine noise hits every arm
            for threads in (all_cores, left):
                runs.setdefault(("idle", threads), []).append(tokens_per_s(threads))
            stop.clear()
            spinner = threading.Thread(target=busy)
            spinner.start()
            time.sleep(1.0)  # the workers busy
            for threads in (all_cores, left):
                runs.setdefault(("busy", threads), []).append(tokens_per_s(threads))
            stop.set()
            spinner.join()

    def mean(key: tuple[str, int]) -> float:
        return statistics.mean(runs[key])

    print(f"{args.model}: {len(prompts)} prompts in one batch, up to {args.tokens} new tokens, "
          f"greedy; {all_cores} cores, sandbox workers {settings.workers}; "
          f"{args.repeat} runs each")
    for (state, threads), values in sorted(runs.items()):
        print(f"  sandbox {state}, torch threads {threads}: {mean((state, threads)):.1f} "
              f"tokens/s ({', '.join(f'{v:.1f}' for v in values)})")
    if left == all_cores:
        print("  the sandbox's workers leave no core to give back here: nothing to compare")
        return
    print(f"beside the busy sandbox, {left} thread(s) against {all_cores}: "
          f"{mean(('busy', left)) / mean(('busy', all_cores)):.2f}x")
    print(f"with the sandbox idle, {left} thread(s) against {all_cores}: "
          f"{mean(('idle', left)) / mean(('idle', all_cores)):.2f}x")


if __name__ == "__main__":
    main()
