"""System-1 generation as evaluate runs it: one static batch (every row computed until the
longest ends, the old path) against segments with finished rows leaving the batch and
replies stopping once their program is written (``bdc.llm.system1.generate_rows``), on the
same rows in the same run.

    .venv/bin/python benchmarks/bench_segments.py [--profile small] [--problems 28]
        [--adapters full,cluster_0] [--greedy]

Uses the profile's experts and test problems (run the pipeline first) and its evaluate
settings (``max_new_tokens``, ``temperature``, ``batch``: rows per batch). Prints tokens/s and
wall time of both, their ratio (both changes at once: fewer tokens, and fewer rows computed
per step), and how many programs are equal (under ``--greedy`` they
should all be: the same tokens up to where the program ends; sampled, the random draws
differ once rows leave the batch).
"""

from __future__ import annotations

import argparse
import json
import time


class NeverWritten:
    """The template as the old path used it: no reply stops before its end of text."""

    def __init__(self, template) -> None:
        self.template = template

    def __getattr__(self, name):
        return getattr(self.template, name)

    def written(self, completion: str) -> bool:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=("mini", "small"), default="small")
    ap.add_argument("--problems", type=int, default=28)
    ap.add_argument("--adapters", default="full,cluster_0")
    ap.add_argument("--greedy", action="store_true")
    args = ap.parse_args()
    from bdc.runtime import configure_environment, project_root

    root = project_root()
    configure_environment(root)
    from bdc.config import load_params
    from bdc.disentangle.registry import load_expert_set
    from bdc.llm.system1 import solve, template_for
    from bdc.problems.format import read_problems

    folder = root if args.profile == "mini" else root / args.profile
    s = load_params(folder / "params.yaml").evaluate
    data = folder / "data"
    manifest = json.loads((data / "experts/manifest.json").read_text())
    peft, tokenizer, _ = load_expert_set(data / "experts", manifest)
    template = template_for(tokenizer, manifest["template"])
    test = read_problems(data / "problems/test.jsonl")[:args.problems]
    adapters = args.adapters.split(",")
    prompts = [p.prompt for p in test] * len(adapters)
    names = [a for a in adapters for _ in test]
    temperature = None if args.greedy else s.temperature or None
    rows = {}
    for name, tpl, segment in (("static batch (old path)", NeverWritten(template),
                                s.max_new_tokens),
                               ("segments, finished rows leave", template, None)):
        counted: list[int] = []
        start = time.perf_counter()
        extra = {} if segment is None else {"segment": segment}
        results = solve(peft, tokenizer, tpl, prompts, s.max_new_tokens, s.batch,
                        adapter_names=names, temperature=temperature, seed=0,
                        on_batch=lambda _s, _r, tokens, c=counted: c.extend(tokens), **extra)
        rows[name] = (time.perf_counter() - start, sum(counted), results)
    print(f"{args.profile}: {len(prompts)} rows ({len(test)} problems x {adapters}), batch "
          f"{s.batch}, up to {s.max_new_tokens} new tokens, "
          f"{'greedy' if temperature is None else f'temperature {temperature}'}")
    print("| path | seconds | tokens | tokens/s |\n|---|---|---|---|")
    for name, (seconds, tokens, _) in rows.items():
        print(f"| {name} | {seconds:.1f} | {tokens} | {tokens / seconds:.0f} |")
    (old, _, a), (new, _, b) = rows.values()
    print(f"ratio static / segmented wall time: {old / new:.2f}")
    print(f"same programs: {sum(x[1] == y[1] for x, y in zip(a, b, strict=True))} of {len(a)}")


if __name__ == "__main__":
    main()
