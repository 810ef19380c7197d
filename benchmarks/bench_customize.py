"""The customized solver's gated forward on a batch of mixed inputs, against a single LoRA
forward at the same batch (target: at most 1.2x) and against the authors' way (a dW
materialised per sample, applied with einsum), in the same run.

    .venv/bin/python benchmarks/bench_customize.py [--batch 32] [--repeat 20]

Uses the pipeline's experts and clusters (run `dvc repro customize` first). The single LoRA
is the exact uniform merge (rank K*r, what the gated layers compute with all gates equal)
and the full-data adapter (rank r).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


class PerSampleDelta(torch.nn.Module):
    """The authors' computation: dW(x) = sum_k B_k diag(w_k(x)) A_k built for every sample
    (batch x out x in), then y = W x + dW(x) x."""

    def __init__(self, gated) -> None:
        super().__init__()
        self.gated = gated

    @property
    def gate(self):
        return self.gated.gate

    @gate.setter
    def gate(self, value) -> None:  # set by CustomizedModel.gated, as on the gated layer
        self.gated.gate = value

    def forward(self, x):
        g = self.gated
        weights = g.scaling * g.gate  # (b, Kr)
        delta = torch.einsum("ok,bk,ki->boi", g.lora_B, weights, g.lora_A)
        return g.base_layer(x) + torch.einsum("boi,bti->bto", delta, x)


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    from bdc.runtime import configure_environment

    configure_environment()
    from peft import PeftModel

    from bdc.customize.solver import load
    from bdc.jsonl import read_jsonl
    from bdc.llm.loading import load_causal_lm

    solver = load(Path("data/hypernet"), Path("data/experts"), Path("data/clusters"))
    model = solver.model.eval()
    prompts = [r["prompt"] for r in read_jsonl("data/explore/sft.jsonl", dict)][:args.batch]
    enc = solver.tokenizer([solver.template.prompt(p) for p in prompts], return_tensors="pt",
                           padding=True)
    z = torch.as_tensor(solver.z(prompts))
    base, _ = load_causal_lm(solver.base)
    single = {name: PeftModel.from_pretrained(load_causal_lm(solver.base)[0],
                                              f"data/experts/{name}").eval()
              for name in ("merge_uniform", "full")}
    with torch.no_grad():
        gated = timed(lambda: model(**enc, z=z), args.repeat)
        lora = {name: timed(lambda m=m: m(**enc), args.repeat) for name, m in single.items()}
        plain = timed(lambda: base(**enc), args.repeat)
        for name in model.config.modules:  # the authors' per-sample dW in the same layers
            parent, child = name.rsplit(".", 1)
            layer = model.model.get_submodule(name)
            setattr(model.model.get_submodule(parent), child, PerSampleDelta(layer))
        authors = timed(lambda: model(**enc, z=z), args.repeat)
    rank = model.config.rank
    print(f"batch {args.batch} x {enc['input_ids'].shape[1]} tokens, "
          f"{len(model.config.modules)} adapted modules, gated rank {rank}; medians of "
          f"{args.repeat}")
    print(f"base alone: {plain * 1e3:.1f} ms")
    print(f"single LoRA, rank {rank} (uniform merge): {lora['merge_uniform'] * 1e3:.1f} ms")
    full_rank = json.loads(Path("data/experts/full/adapter_config.json").read_text())["r"]
    print(f"single LoRA, rank {full_rank} (full data): {lora['full'] * 1e3:.1f} ms")
    print(f"gated (customized): {gated * 1e3:.1f} ms")
    print(f"authors' per-sample dW: {authors * 1e3:.1f} ms")
    print(f"ratio gated / single LoRA of the same rank: {gated / lora['merge_uniform']:.2f} "
          f"(target <= 1.2); / rank-r LoRA: {gated / lora['full']:.2f}")
    print(f"ratio authors' per-sample dW / gated: {authors / gated:.2f}")


if __name__ == "__main__":
    main()
