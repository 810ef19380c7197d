"""Stage ``evaluate``: every System-1 solver the pipeline made on the test problems' hidden
tests (the only stage that reads them), with the System-2 side for reference, in one table;
and the answer to "did Boost, Disentangle and Customize each help?" as measured.

Solvers: the base model; the full-data LoRA; each expert alone; the oracle expert (the
expert of the cluster the problem's family's training records fell in: mini only); the
uniform, linear, TIES and DARE merges; Arrow; the customized solver. System-2 rows: the
tree of agents and each agent's own tree, at the explore budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

from bdc.config import Params
from bdc.evaluation import Runner, markdown, mean_std, table
from bdc.jsonl import atomic_open, read_jsonl, write_jsonl, write_metrics
from bdc.problems.format import Problem, read_problems
from bdc.problems.mini import first_per_family

BASE = "base"
log = logging.getLogger(__name__)
# the numbers `dvc metrics show` shows (the claims' solvers); every solver's go to
# data/metrics/details/evaluate.json and the table
# (and the System-2 tree of all agents, whatever their names)
HEADLINE = tuple(f"{solver}.strict_accuracy" for solver in (
    "base", "full", "oracle expert", "merge_uniform", "arrow", "customized"))


def group_of(problem: Problem) -> str:
    """The row's slice: the mini family, the CodeContests band, the APPS difficulty, or the
    source (HumanEval, MBPP)."""
    meta = problem.meta
    return str(meta.get("family") or meta.get("band") or meta.get("difficulty")
               or problem.source)


def home_clusters(clusters_dir: Path) -> dict[str, int]:
    """Family -> the cluster most of its training problems fell in (mini)."""
    by: dict[str, Counter] = defaultdict(Counter)
    for row in read_jsonl(clusters_dir / "problems.jsonl", dict):
        if row.get("family"):
            by[row["family"]][row["cluster"]] += 1
    return {f: c.most_common(1)[0][0] for f, c in by.items()}


def oracle_adapter(problem: Problem, home: dict[str, int]) -> str:
    """The oracle's adapter for a test problem: its family's home expert. A family with no
    training records has no expert to know about, so the oracle is the base model there (the
    table lists those families under ``oracle_without_expert``)."""
    family = problem.meta.get("family")
    return f"cluster_{home[family]}" if family in home else "__base__"


def system2(params: Params, test: list[Problem], seeds: list[int], sandbox) -> dict:
    """The tree of agents and each agent's own tree on the test problems (reference)."""
    from bdc.boost.compare import Method, run_method
    from bdc.boost.exploration import closing, make_agents

    agents = make_agents(params.explore.agents, params.explore.cpu_threads)
    methods = [Method("system2", "tree", tuple(agents)),
               *[Method("system2", "tree", (a,)) for a in agents]] if len(agents) > 1 else \
        [Method("system2", "tree", tuple(agents))]

    async def all_runs() -> dict:
        out = {}
        for method in methods:
            runs = [await run_method(method, test, params.explore, sandbox, seed)
                    for seed in seeds]
            out[f"System-2: {method.name}"] = {
                "pass_rate": mean_std([100 * r["hidden_pass_rate"] for r in runs]),
                "strict_accuracy": mean_std([100 * r["hidden_solve_rate"] for r in runs]),
                "tokens": statistics.mean(r["tokens_per_problem"] for r in runs) * len(test),
                "programs_per_problem": statistics.mean(r["programs_per_problem"]
                                                        for r in runs),
                "seconds": None, "seeds": len(runs), "by_group": {}}
        return out

    return asyncio.run(closing(agents, all_runs()))


def claims(result: dict, experts: list[str], own: dict[str, dict]) -> dict:
    """B, D and C as differences of strict accuracy (mean over seeds), with the baseline."""
    def strict(name: str) -> float | None:
        return result[name]["strict_accuracy"]["mean"] if name in result else None

    def gap(a: str, b: str) -> dict | None:
        if strict(a) is None or strict(b) is None:
            return None
        return {"solver": a, "baseline": b, "difference": strict(a) - strict(b)}

    tree = next((n for n in result if n.startswith("System-2: tree(") and "+" in n), None)
    singles = [n for n in result if n.startswith("System-2: tree(") and "+" not in n]
    return {
        "B_tree_vs_each_agent": [gap(tree, s) for s in singles] if tree else [],
        "D_oracle_vs_full": gap("oracle expert", "full"),
        "D_experts_vs_full_on_own_cluster": own,
        "C_customized_vs_full": gap("customized", "full"),
        "C_customized_vs_uniform": gap("customized", "merge_uniform"),
        "C_customized_vs_arrow": gap("customized", "arrow"),
        "C_customized_vs_oracle": gap("customized", "oracle expert"),
    }


def own_cluster(outcomes, routes: dict[str, int], experts: list[str]) -> dict:
    """Each expert against the full-data LoRA on the test problems routed to its cluster."""
    out = {}
    for c, name in enumerate(experts):
        mine = {pid for pid, r in routes.items() if r == c}
        rows = {solver: [o.passed_all for o in outcomes if o.solver == solver and
                         o.problem_id in mine] for solver in (name, "full")}
        if rows[name]:
            out[name] = {"problems": len(mine), "expert": 100 * statistics.mean(rows[name]),
                         "full": 100 * statistics.mean(rows["full"])}
    return out


def figures(result: dict, order: list[str], groups: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in order if n in result]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1))
    ax.barh(names, [result[n]["strict_accuracy"]["mean"] for n in names],
            xerr=[result[n]["strict_accuracy"]["std"] for n in names], color="C0")
    ax.invert_yaxis()
    ax.set_xlabel("strict accuracy on hidden tests (%), mean ± std over seeds")
    fig.tight_layout()
    rows = [n for n in names if result[n].get("by_group")]
    heat, hx = plt.subplots(figsize=(1.2 * len(groups) + 2, 0.35 * len(rows) + 1))
    image = hx.imshow([[result[n]["by_group"].get(g, {}).get("strict_accuracy", {})
                        .get("mean", 0) for g in groups] for n in rows], cmap="viridis",
                      aspect="auto")
    hx.set_xticks(range(len(groups)), groups, rotation=45)
    hx.set_yticks(range(len(rows)), rows)
    heat.colorbar(image, label="strict accuracy (%)")
    heat.tight_layout()
    return fig, heat


def adapter_rows(test: list[Problem], manifest: dict, home: dict[str, int]
                 ) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """The base, the full-data LoRA, each expert, the merges and the oracle expert as rows
    of one batch: ``(labels, adapter names, prompts)``, ``__base__`` for the base alone."""
    rows = [(BASE, "__base__"), ("full", "full"), *[(e, e) for e in manifest["experts"]],
            *[(a, a) for a in manifest["adapters"] if a.startswith("merge_")]]
    labels, names, prompts = [], [], []
    for solver, adapter in rows:
        labels += [(solver, p.id) for p in test]
        names += [adapter] * len(test)
        prompts += [p.prompt for p in test]
    if home:
        labels += [("oracle expert", p.id) for p in test]
        names += [oracle_adapter(p, home) for p in test]
        prompts += [p.prompt for p in test]
    return labels, names, prompts


def adapter_solvers(runner: Runner, test: list[Problem], experts_dir: Path, manifest: dict,
                    home: dict[str, int], s, temperature: float | None):
    """Every adapter-based solver as rows of the same PEFT mixed-adapter batches. The
    template."""
    from bdc.disentangle.registry import load_expert_set
    from bdc.system1 import solve, template_for

    peft, tokenizer, _ = load_expert_set(experts_dir, manifest)
    template = template_for(tokenizer, manifest["template"])
    labels, names, prompts = adapter_rows(test, manifest, home)
    for seed in s.seeds:
        runner.generate(labels, seed, lambda cb, seed=seed: solve(
            peft, tokenizer, template, prompts, s.max_new_tokens, s.batch, adapter_names=names,
            temperature=temperature, seed=seed, on_batch=cb))
    return template


def served_solvers(runner: Runner, test: list[Problem], experts_dir: Path, clusters_dir: Path,
                   hypernet_dir: Path, manifest: dict, home: dict[str, int], params: Params,
                   temperature: float | None):
    """``evaluate.engine: vllm``: the adapter solvers and the customized solver (one folded
    rank-K*r adapter per problem, through the fold cache) on vLLM's server, one adapter per
    request, every solver's requests in flight together. The template."""
    import hashlib

    import torch

    from bdc.customize.fold import FoldedCache
    from bdc.customize.solver import load
    from bdc.runtime import project_root, state_dir
    from bdc.system1 import solve_served
    from bdc.vllm_server import Adapter, VLLMServer

    s = params.evaluate
    solver = load(hypernet_dir, experts_dir, clusters_dir, base=manifest["base"])
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(hypernet_dir.rglob("*"))
                                     if f.is_file())).hexdigest()[:16]
    cache = FoldedCache(solver.model, state_dir() / "cache" / "folded" / f"eval-{digest}",
                        manifest["base"], params.customize.fold_precision)
    labels, names, prompts = adapter_rows(test, manifest, home)
    adapters = [None if n == "__base__" else Adapter(n, experts_dir / n) for n in names]
    z = torch.as_tensor(solver.z([p.prompt for p in test]))
    for i, p in enumerate(test):
        labels.append(("customized", p.id))
        prompts.append(p.prompt)
        key = z[i:i + 1]
        adapters.append(Adapter(f"fold-{cache.key(key)}", cache.adapter(key)))
    log.info("evaluate: %d folded adapters for %d problems (cache hit rate %.2f)",
             cache.misses + cache.hits, len(test), cache.hit_rate)
    base = Path(manifest["base"])  # a folder (relative to the project), or a hub id
    base = project_root() / base if (project_root() / base).exists() else manifest["base"]
    with VLLMServer(base, params.vllm, project_root(), "base",
                    lora_rank=cache.max_lora_rank) as server:
        for seed in s.seeds:
            runner.generate(labels, seed, lambda cb, seed=seed: cb(0, *solve_served(
                server, solver.template, prompts, adapters, s.max_new_tokens, temperature,
                seed)))
    return solver.template


def customized(runner: Runner, test: list[Problem], experts_dir: Path, clusters_dir: Path,
               hypernet_dir: Path, s, temperature: float | None) -> None:
    """The hypernetwork's gated forward, through the same batched path."""
    from bdc.customize.solver import load
    from bdc.system1 import solve

    solver = load(hypernet_dir, experts_dir, clusters_dir)
    prompts = [p.prompt for p in test]
    z = solver.z(prompts)
    for seed in s.seeds:
        runner.generate([("customized", p.id) for p in test], seed, lambda cb, seed=seed: solve(
            solver.model, solver.tokenizer, solver.template, prompts, s.max_new_tokens,
            s.batch, temperature=temperature, seed=seed, z=z, on_batch=cb))


def arrow(runner: Runner, test: list[Problem], experts_dir: Path, manifest: dict, template,
          params: Params, temperature: float | None) -> None:
    """Arrow's training-free per-token routing over the experts."""
    from bdc.disentangle.merging import arrow_model
    from bdc.system1 import solve

    s = params.evaluate
    model, tokenizer = arrow_model(manifest["base"], [experts_dir / e for e in
                                                      manifest["experts"]],
                                   params.experts.arrow_top_k, params.seed)
    prompts = [p.prompt for p in test]
    for seed in s.seeds:
        runner.generate([("arrow", p.id) for p in test], seed, lambda cb, seed=seed: solve(
            model, tokenizer, template, prompts, s.max_new_tokens, s.batch,
            temperature=temperature, seed=seed, on_batch=cb))


def run(params: Params, problems_dir: Path, experts_dir: Path, clusters_dir: Path,
        hypernet_dir: Path, out_dir: Path, metrics_path: Path, plots_dir: Path) -> dict:
    """The stage with its MLflow run; the table."""
    import torch

    from bdc.sandbox import Sandbox
    from bdc.stages.experts import route
    from bdc.tracking import stage_run

    s = params.evaluate
    test = read_problems(problems_dir / "test.jsonl")
    test = first_per_family(test, s.per_group, group_of)  # per slice, family or source
    groups = {p.id: group_of(p) for p in test}
    manifest = json.loads((experts_dir / "manifest.json").read_text())
    experts = manifest["experts"]
    merges = [a for a in manifest["adapters"] if a.startswith("merge_")]
    home = home_clusters(clusters_dir)
    temperature = s.temperature or None
    with stage_run("evaluate", {"evaluate": s.model_dump(), "experts.base": params.experts.base,
                                "problems": len(test)}, params.profile) as tracked, \
            Sandbox(params.sandbox) as sandbox:
        tracked.dataset(problems_dir / "test.jsonl", "test problems", "evaluation")
        runner = Runner({p.id: p for p in test}, sandbox)
        clock = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal clock
            log.info("evaluate: %s in %.1fs", name, time.perf_counter() - clock)
            clock = time.perf_counter()

        if s.engine == "vllm":
            template = served_solvers(runner, test, experts_dir, clusters_dir, hypernet_dir,
                                      manifest, home, params, temperature)
            phase("adapter and customized solvers generated on vLLM")
        else:
            template = adapter_solvers(runner, test, experts_dir, manifest, home, s,
                                       temperature)
            phase("adapter solvers generated")
            customized(runner, test, experts_dir, clusters_dir, hypernet_dir, s, temperature)
            phase("customized solver generated")
        if len(experts) > 1:
            arrow(runner, test, experts_dir, manifest, template, params, temperature)
            phase("Arrow generated")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        outcomes = runner.finish()
        phase("programs scored")
        result = table(outcomes, groups, s.seeds, s.ks)
        if s.system2:
            result.update(system2(params, test, s.system2_seeds or s.seeds, sandbox))
            phase("System-2 searched")
        routes = dict(zip([p.id for p in test], route(test, clusters_dir).tolist(),
                          strict=True))
        measured = claims(result, experts, own_cluster(outcomes, routes, experts))
        order = [BASE, "full", *experts, "oracle expert", *merges, "arrow", "customized",
                 *[n for n in result if n.startswith("System-2")]]
        sampling = "greedy: the seeds draw the same programs, so std is 0 by construction" \
            if temperature is None else f"sampling at temperature {s.temperature}"
        no_expert = sorted({str(p.meta.get("family")) for p in test
                            if home and p.meta.get("family") not in home})
        note = (f"{len(test)} test problems; hidden tests; {len(s.seeds)} seeds ({sampling}); "
                "mean ± sample std over the seeds; tokens and seconds per seed."
                + (" Generated on vLLM (Arrow on transformers: vLLM has no per-token "
                   "router)." if s.engine == "vllm" else "")
                + (f" Families without training records (the oracle uses the base model): "
                   f"{', '.join(no_expert)}." if no_expert else ""))
        md = markdown(result, order, s.ks, note)
        write_jsonl(out_dir / "samples.jsonl", [o.__dict__ for o in outcomes])
        with atomic_open(out_dir / "table.json") as f:
            json.dump({"solvers": result, "claims": measured, "order": order,
                       "oracle_without_expert": no_expert}, f, indent=2)
        with atomic_open(out_dir / "table.md") as f:
            f.write(md)
        headline = {name.replace("System-2: ", "system2."): {
            "pass_rate": round(r["pass_rate"]["mean"], 2),
            "strict_accuracy": round(r["strict_accuracy"]["mean"], 2),
            "strict_accuracy_std": round(r["strict_accuracy"]["std"], 2)}
            for name, r in result.items()}
        trees = tuple(f"{n}.strict_accuracy" for n in headline  # the agents' own names
                      if n.startswith("system2.tree(") and "+" in n)
        write_metrics(metrics_path, headline, HEADLINE + trees)
        with atomic_open(plots_dir / "eval_solvers.csv") as f:
            f.write("solver,strict_accuracy,std,pass_rate\n" + "".join(
                f"{n},{result[n]['strict_accuracy']['mean']:.2f},"
                f"{result[n]['strict_accuracy']['std']:.2f},{result[n]['pass_rate']['mean']:.2f}\n"
                for n in order if n in result))
        group_names = sorted({g for r in result.values() for g in r.get("by_group", {})})
        bars, heat = figures(result, order, group_names)
        bars.savefig(plots_dir / "eval_solvers.png", dpi=110)
        heat.savefig(plots_dir / "eval_families.png", dpi=110)
        tracked.metrics({n: {"pass_rate": r["pass_rate"]["mean"],
                             "strict_accuracy": r["strict_accuracy"]["mean"]}
                         for n, r in result.items()})
        tracked.table([{"solver": n, **{k: v for k, v in headline[
            n.replace("System-2: ", "system2.")].items()}} for n in order if n in result],
            "table.json")
        tracked.artifact(out_dir / "table.md")
        tracked.artifact(plots_dir / "eval_solvers.png")
        tracked.artifact(plots_dir / "eval_families.png")
        tracked.tag("bdc.summary", "table.md")
        for key, value in {"experts": len(experts), "temperature": s.temperature,
                           "seeds": len(s.seeds), "base": params.experts.base}.items():
            tracked.tag(f"bdc.eval.{key}", str(value))
    return {"table": md, "claims": measured, "problems": len(test)}
