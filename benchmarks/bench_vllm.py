"""Serving the customized solver on vLLM (one folded rank-K*r adapter per problem, fold cache
on) against serving a single adapter for every request (target: throughput ratio >= 0.8),
and vLLM against the HF path on the same requests, in the same run.

    .venv/bin/python benchmarks/bench_vllm.py [--problems 60] [--tokens 96] [--max-loras 32]
        [--baseline-max-loras 4] [--profile small]

One server (``--max-loras`` slots, default ``vllm.max_loras``) serves both paths, so the ratio
is measured on the same engine. With an adapter per request a batch holds at most
``max_loras`` requests, so a server for customized solvers sets it to the requests in flight
(``vllm.max_concurrency``); a single adapter runs fastest on a server with few slots, so the
single adapter is also served by a second server with ``--baseline-max-loras`` slots and that
ratio printed too (0 skips it).

Uses the pipeline's experts, clusters and hypernetwork (run `make run` first) and the vLLM
environment (`make .venv-vllm/.installed`). Greedy decoding, so the two engines write the
same programs and count the same tokens. On tiny CPU models HF's batched generate may win;
speed claims belong to a GPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--problems", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--max-loras", type=int, default=None)
    parser.add_argument("--baseline-max-loras", type=int, default=4)
    parser.add_argument("--profile", choices=("mini", "small"), default="mini",
                        help="whose params and data (small: small/params.yaml, small/data)")
    args = parser.parse_args()

    from bdc.config import load_params
    from bdc.customize.fold import FoldedCache
    from bdc.customize.solver import load
    from bdc.llm.system1 import solve, solve_served
    from bdc.llm.vllm_server import Adapter, VLLMServer
    from bdc.problems.format import read_problems
    from bdc.runtime import configure_environment, project_root, state_dir

    root = project_root()
    configure_environment(root)
    folder = root if args.profile == "mini" else root / args.profile
    params = load_params(folder / "params.yaml")
    data = folder / "data"
    manifest = json.loads((data / "experts/manifest.json").read_text())
    test = read_problems(data / "problems/test.jsonl")[:args.problems]
    prompts = [p.prompt for p in test]
    solver = load(data / "hypernet", data / "experts", data / "clusters", manifest["base"])
    z = torch.as_tensor(solver.z(prompts))
    cache = FoldedCache(solver.model, state_dir(root) / "cache" / "folded" / "bench",
                        manifest["base"], params.customize.fold_precision)
    folded = [Adapter(f"fold-{cache.key(z[i:i + 1])}", cache.adapter(z[i:i + 1]))
              for i in range(len(test))]
    # the same rank as the folded adapters (K*r): the exact uniform merge
    single = [Adapter("merge_uniform", data / "experts/merge_uniform")] * len(test)
    slots = args.max_loras or params.vllm.max_loras
    settings = params.vllm.model_copy(update={"max_loras": slots})
    template = solver.template

    base = root / manifest["base"]  # a folder of the project, or a packaged model's name
    base = base if base.exists() else manifest["base"]
    with VLLMServer(base, settings, root, "base", lora_rank=cache.max_lora_rank) as server:
        solve_served(server, template, prompts[:4], single[:4], 8)  # warm-up
        rows = {}
        for name, adapters in (("the base, no adapter", [None] * len(test)),
                               ("single adapter (uniform merge, rank K*r) for all", single),
                               ("customized: a folded adapter per problem", folded)):
            start = time.perf_counter()
            results, tokens = solve_served(server, template, prompts, adapters, args.tokens)
            seconds = time.perf_counter() - start
            rows[name] = (sum(tokens) / seconds, seconds, results)
    single_name = "single adapter (uniform merge, rank K*r) for all"
    if args.baseline_max_loras:
        name = f"{single_name}, on a server with {args.baseline_max_loras} slots"
        few = params.vllm.model_copy(update={"max_loras": args.baseline_max_loras})
        with VLLMServer(base, few, root, "base", lora_rank=cache.max_lora_rank) as server:
            solve_served(server, template, prompts[:4], single[:4], 8)  # warm-up
            start = time.perf_counter()
            results, tokens = solve_served(server, template, prompts, single, args.tokens)
            seconds = time.perf_counter() - start
            rows[name] = (sum(tokens) / seconds, seconds, results)

    counted: list[int] = []
    start = time.perf_counter()
    hf = solve(solver.model, solver.tokenizer, template, prompts, args.tokens, 32, z=z,
               on_batch=lambda _start, _results, tokens: counted.extend(tokens))
    hf_seconds = time.perf_counter() - start
    customized = rows["customized: a folded adapter per problem"]
    hf_tokens = sum(counted)
    print(f"{len(test)} problems, {args.tokens} new tokens at most, greedy fp32, "
          f"max_loras {slots} (the base a zero adapter), "
          f"folded rank {cache.max_lora_rank}, {len(set(a.name for a in folded))} folded "
          f"adapters (cache hit rate {cache.hit_rate:.2f})")
    print("| path | tokens/s | seconds |\n|---|---|---|")
    for name, (rate, seconds, _) in rows.items():
        print(f"| vLLM, {name} | {rate:.0f} | {seconds:.1f} |")
    print(f"| HF, customized (gated forward, batch 32) | {hf_tokens / hf_seconds:.0f} | "
          f"{hf_seconds:.1f} |")
    for name, (rate, _, _) in rows.items():
        if name.startswith(single_name):
            where = name[len(single_name):].lstrip(", ") or f"on the same server ({slots} slots)"
            print(f"ratio customized / single adapter throughput, {where}: "
                  f"{customized[0] / rate:.2f} (target >= 0.8)")
    print(f"ratio vLLM / HF wall time, customized: {customized[1] / hf_seconds:.2f}")
    same = sum(a == b for a, b in zip(customized[2], hf, strict=True))
    print(f"customized programs equal on both engines: {same}/{len(hf)}")


if __name__ == "__main__":
    main()
