"""Generation on a real model: vLLM's server against transformers' batched ``generate`` on
the same prompts, greedy, in the same run.

    .venv/bin/python benchmarks/bench_generate.py [--model smollm2-135m-instruct]
        [--prompts 32] [--tokens 96] [--batch 16]

The prompts: the first mini test problems through the model's System-1 template (its chat
template for an instruction-tuned model). The model: a packaged real model (`bdc models
prepare NAME` first) or a folder. Needs the vLLM environment (`make .venv-vllm/.installed`).
Prints each engine's generated tokens per second (vLLM's start-up apart), their ratio, and
whether the two wrote the same programs (greedy fp32: they should).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    from bdc.runtime import configure_environment, project_root

    root = project_root()
    configure_environment(root)
    import torch

    from bdc.config import load_params
    from bdc.llm.loading import load_causal_lm
    from bdc.llm.system1 import solve, solve_served, template_for
    from bdc.llm.vllm_server import VLLMServer
    from bdc.problems import mini

    torch.set_num_threads(2)
    problems = mini.load(slice="test", limit=-(-args.prompts // 6)).problems[:args.prompts]
    prompts = [p.prompt for p in problems]
    model, tokenizer = load_causal_lm(args.model)
    template = template_for(tokenizer)
    counted: list[int] = []
    start = time.perf_counter()
    hf = solve(model, tokenizer, template, prompts, args.tokens, args.batch,
               on_batch=lambda _, results, tokens: counted.extend(tokens))
    hf_s = time.perf_counter() - start
    del model
    settings = load_params(root / "params.yaml").vllm.model_copy(
        update={"max_model_len": 2048, "startup_timeout_s": 600})
    start = time.perf_counter()
    with VLLMServer(args.model, settings, root, "bench") as server:
        started = time.perf_counter() - start
        start = time.perf_counter()
        served, tokens = solve_served(server, template, prompts, [None] * len(prompts),
                                      args.tokens)
        vllm_s = time.perf_counter() - start
    print(f"{args.model}: {len(prompts)} prompts, up to {args.tokens} new tokens, greedy")
    print(f"transformers generate, batch {args.batch}: {sum(counted) / hf_s:.0f} tokens/s "
          f"({sum(counted)} tokens, {hf_s:.1f}s)")
    print(f"vLLM server, all in flight: {sum(tokens) / vllm_s:.0f} tokens/s ({sum(tokens)} "
          f"tokens, {vllm_s:.1f}s; start-up {started:.0f}s apart)")
    print(f"ratio vLLM / transformers: {(sum(tokens) / vllm_s) / (sum(counted) / hf_s):.2f}; "
          f"same programs: {sum(a == b for a, b in zip(hf, served, strict=True))} of "
          f"{len(prompts)}")


if __name__ == "__main__":
    main()
