"""The search's own cost, against baselines measured in the same run.

1. Search overhead per node: MC-Tree-of-Agents with zero-latency scripted agents (every
   program identical, so after its first run the sandbox answers from the tree's cache):
   what selection, expansion, bookkeeping and asyncio cost per node, printed next to one
   sandbox execution measured in the same run.
2. Local backend throughput inside the search: tokens/s the transformers backends generate
   while many trees search at once (batched across trees, sandbox overlapping), as a ratio to
   plain batched ``generate`` run on exactly the batches the search formed (same prompts,
   batch sizes, lengths and stop strings), one after another. Target >= 0.7.

Needs the mini models (``dvc repro pretrain``).

    .venv/bin/python benchmarks/bench_explore.py [--problems 60]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bdc.runtime import configure_environment


def overhead(sandbox, problems, nodes_wanted: int = 3000) -> tuple[float, float, int]:
    from bdc.boost.agents.scripted import ScriptedAgent
    from bdc.boost.tree_of_agents import Search
    from bdc.config import SearchSettings
    from bdc.sandbox import Execution

    program = "def f(*a):\n    return None\n"
    agents = [ScriptedAgent(n, lambda v, th, w, s: [(f"step {len(th)}.{i} {s % 97}", 0.5)
                                                    for i in range(w)],
                            lambda v, th, n, s: [program] * n) for n in ("a", "b")]
    settings = SearchSettings(width=3, trials=2, rollouts=16, max_depth=4, refine=False,
                              boost=False, prune=False, max_programs=10_000)
    views = [p.public_view() for p in problems]

    async def go():
        with ThreadPoolExecutor(4) as pool:
            return await asyncio.gather(*[Search(v, agents, settings, sandbox, pool, 0).run()
                                          for v in views])

    start = time.perf_counter()
    trees = asyncio.run(go())
    seconds = time.perf_counter() - start
    nodes = sum(len(t.nodes) for t in trees)
    one = problems[0]
    execution = Execution(program, one.kind, one.entry_point, list(one.tests.public))
    sandbox.run(execution)
    runs = 20
    start = time.perf_counter()
    for _ in range(runs):
        sandbox.run(execution)
    per_run = (time.perf_counter() - start) / runs
    # each problem ran its program once in the sandbox (the rest were cache hits)
    per_node = (seconds - len(problems) * per_run / sandbox.settings.workers) / nodes
    return per_node, per_run, nodes


def record_batches(backends) -> list[tuple[object, list]]:
    """Every batch the backends run, in order (the search's real batch sizes and lengths)."""
    batches: list[tuple[object, list]] = []
    for backend in backends:
        run = backend.run_batch

        def recording(requests, run=run, backend=backend):
            batches.append((backend, requests))
            return run(requests)
        backend.run_batch = recording
    return batches


def plain_generate(batches) -> tuple[int, float]:
    """The same batches through plain ``generate`` (sampling, same prompts, lengths and stop
    strings), one after another with no search around them: (tokens, seconds)."""
    import torch

    tokens, seconds = 0, 0.0
    for backend, requests in batches:
        tok, model, first = backend.tokenizer, backend.model, requests[0]
        enc = tok([r.prompt for r in requests for _ in range(r.n)], return_tensors="pt",
                  padding=True)
        stop = {"stop_strings": list(first.stop), "tokenizer": tok} if first.stop else {}
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=first.max_tokens, do_sample=True,
                                 temperature=first.temperature, top_k=0,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 **stop)
        seconds += time.perf_counter() - start
        new = out[:, enc["input_ids"].shape[1]:]
        ends = (new == tok.eos_token_id) | (new == tok.pad_token_id)
        tokens += int(torch.where(ends.any(1), ends.float().argmax(1) + 1,
                                  torch.tensor(new.shape[1])).sum())
    return tokens, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=60)
    args = ap.parse_args()
    configure_environment()
    import torch

    from bdc.boost.exploration import make_agents, search_all
    from bdc.config import load_params
    from bdc.problems.format import read_problems
    from bdc.sandbox import Sandbox

    params = load_params("params.yaml")
    problems = read_problems(Path("data/problems/explore.jsonl"))[::5][:args.problems]
    with Sandbox(params.sandbox) as sandbox:
        per_node, per_run, nodes = overhead(sandbox, problems)
        print(f"search overhead: {per_node * 1e6:.0f} us per node over {nodes} nodes "
              f"(one sandbox execution: {per_run * 1e3:.1f} ms, "
              f"{per_node / per_run:.3f} of it)")

        default_threads = torch.get_num_threads()
        # sets the threads the search runs with
        agents = make_agents(params.explore.agents, params.explore.cpu_threads)
        search_threads = torch.get_num_threads()
        backends = list({id(a.backend): a.backend for a in agents}.values())
        batches = record_batches(backends)
        start = time.perf_counter()
        asyncio.run(search_all(problems, agents, params.explore, sandbox, params.seed,
                               lambda *a: None, lambda problem, exc: print(problem.id, exc)))
        wall = time.perf_counter() - start
        tokens = sum(b.generated_tokens for b in backends)
        busy = sum(b.busy_seconds for b in backends)
        in_search = tokens / wall
        sizes = [sum(r.n for r in requests) for _, requests in batches]
        torch.set_num_threads(default_threads)  # plain generate at its best: every core
        plain_generate(batches[:2])  # warm-up
        # the better of two passes: a conservative baseline on a noisy machine
        plain = max(t / s for t, s in (plain_generate(batches) for _ in range(2)))
        print(f"generation inside the search: {in_search:.0f} tokens/s over {wall:.1f}s "
              f"({len(backends)} models generating {busy / wall:.0%} of the time, "
              f"{search_threads} torch threads); {len(batches)} batches of "
              f"{sum(sizes) / len(sizes):.1f} sequences on average")
        print(f"plain batched generate, same batches one after another "
              f"({default_threads} torch threads, better of 2 passes): {plain:.0f} tokens/s")
        print(f"ratio: {in_search / plain:.2f} (target >= 0.7)")


if __name__ == "__main__":
    main()
