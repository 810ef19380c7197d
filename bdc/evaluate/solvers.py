"""Every System-1 solver the pipeline made, run on the same test problems through the same
batched paths, and the System-2 side for reference (:mod:`bdc.evaluate.system2`).

Solvers: the base model; the full-data LoRA; each expert alone; the oracle expert (the
expert of the cluster the problem's family's training records fell in: mini only); the
uniform, linear, TIES and DARE merges; Arrow; the customized solver. A solver's replicates
(one per seed) of every problem share batches (or, on ``evaluate.engine: vllm``, one served
adapter per request). System-2 rows: the tree of agents, each agent's own tree and best-of-N
pooled over the agents, at the explore budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from bdc import artifacts
from bdc.config import Params
from bdc.disentangle.experts import BASE_ADAPTER, FULL, expert_name
from bdc.disentangle.routing import route
from bdc.evaluate.claims import claims, own_cluster
from bdc.evaluate.runner import Outcome, Runner
from bdc.evaluate.system2 import system2
from bdc.evaluate.table import per_problem, system2_rows, table
from bdc.jsonl import read_jsonl
from bdc.problems.format import Problem
from bdc.reuse import code_version, digest, folder_digest, identity

BASE = "base"  # the base model's row (its adapter is BASE_ADAPTER: none)
log = logging.getLogger(__name__)


def group_of(problem: Problem) -> str:
    """The row's slice: the mini family, the CodeContests band, the APPS difficulty, or the
    source (HumanEval, MBPP)."""
    meta = problem.meta
    return str(meta.get("family") or meta.get("band") or meta.get("difficulty")
               or problem.source)


def home_clusters(clusters_dir: Path) -> dict[str, int]:
    """Family -> the cluster most of its training problems fell in (mini)."""
    by: dict[str, Counter] = defaultdict(Counter)
    for row in read_jsonl(clusters_dir / artifacts.CLUSTER_PROBLEMS, dict):
        if row.get("family"):
            by[row["family"]][row["cluster"]] += 1
    return {f: c.most_common(1)[0][0] for f, c in by.items()}


def oracle_adapter(problem: Problem, home: dict[str, int]) -> str:
    """The oracle's adapter for a test problem: its family's home expert. A family with no
    training records has no expert to know about, so the oracle is the base model there (the
    table lists those families under ``oracle_without_expert``)."""
    family = problem.meta.get("family")
    return expert_name(home[family]) if family in home else BASE_ADAPTER


def adapter_solver_names(manifest: dict) -> list[tuple[str, str]]:
    """``(solver, adapter)``: the base (``BASE_ADAPTER``: none), the full-data LoRA, each
    expert and each merge."""
    return [(BASE, BASE_ADAPTER), (FULL, FULL), *[(e, e) for e in manifest["experts"]],
            *[(a, a) for a in manifest["adapters"] if a.startswith("merge_")]]


def replicates(solver: str, test: list[Problem], seeds: list[int]
               ) -> tuple[list[tuple[str, str, int]], list[str]]:
    """A solver's rows: one per seed and problem, ``(labels, prompts)``."""
    return ([(solver, p.id, seed) for seed in seeds for p in test],
            [p.prompt for _ in seeds for p in test])


def oracle_rows(outcomes: list[Outcome], test: list[Problem], home: dict[str, int]
                ) -> list[Outcome]:
    """The oracle expert's rows: for each problem and seed, the row of the expert the oracle
    picks (:func:`oracle_adapter`), the same model and the same sample, so the oracle and the
    experts are compared on the same programs (and the oracle costs no generation)."""
    by = {(o.solver, o.problem_id, o.seed): o for o in outcomes}
    seeds = sorted({o.seed for o in outcomes if o.solver == BASE})
    solver = {BASE_ADAPTER: BASE}  # an expert's adapter is named as its solver
    return [dataclasses.replace(by[(solver.get(a, a), p.id, seed)], solver="oracle expert")
            for seed in seeds for p in test for a in [oracle_adapter(p, home)]]


def adapter_solvers(runner: Runner, test: list[Problem], experts_dir: Path, manifest: dict,
                    s, temperature: float | None) -> None:
    """Every adapter-based solver, one chunk each: its replicates of every problem are the
    rows of the same batches, sampled from the first seed's generator (the expert set loads
    only when a chunk is left to generate)."""
    from bdc.disentangle.registry import load_expert_set
    from bdc.llm.system1 import solve, template_for

    @functools.cache
    def loaded():
        peft, tokenizer, _ = load_expert_set(experts_dir, manifest)
        return peft, tokenizer, template_for(tokenizer, manifest["template"])

    for solver, adapter in adapter_solver_names(manifest):
        labels, prompts = replicates(solver, test, s.seeds)
        runner.generate(labels, lambda cb, prompts=prompts, adapter=adapter: solve(
            *loaded(), prompts, s.max_new_tokens, s.batch,
            adapter_names=[adapter] * len(prompts), temperature=temperature,
            seed=s.seeds[0], on_batch=cb), chunk=f"solver.{solver}", load=loaded)


def served_solvers(runner: Runner, test: list[Problem], experts_dir: Path, clusters_dir: Path,
                   hypernet_dir: Path, manifest: dict, params: Params,
                   temperature: float | None) -> None:
    """``evaluate.engine: vllm``: the adapter solvers and the customized solver (one folded
    rank-K*r adapter per problem, through the fold cache) on vLLM's server, one adapter per
    request, every solver's requests in flight together (the server starts only when a
    seed is left to generate)."""
    import torch

    from bdc.customize.fold import FoldedCache
    from bdc.customize.solver import load
    from bdc.llm.system1 import solve_served
    from bdc.llm.vllm_server import Adapter, VLLMServer
    from bdc.runtime import project_root, state_dir

    s = params.evaluate
    rows = [*adapter_solver_names(manifest), ("customized", None)]
    names = [adapter for _, adapter in rows for _ in test]
    prompts = [p.prompt for _ in rows for p in test]

    @functools.cache
    def requests() -> tuple:
        solver = load(hypernet_dir, experts_dir, clusters_dir, base=manifest["base"])
        digest = folder_digest(hypernet_dir)[:16]
        cache = FoldedCache(solver.model, state_dir() / "cache" / "folded" / f"eval-{digest}",
                            manifest["base"], params.customize.fold_precision)
        adapters = [None if n == BASE_ADAPTER else Adapter(n, experts_dir / n)
                    for n in names[:-len(test)]]
        z = torch.as_tensor(solver.z([p.prompt for p in test]))
        for i in range(len(test)):
            key = z[i:i + 1]
            adapters.append(Adapter(f"fold-{cache.key(key)}", cache.adapter(key)))
        log.info("evaluate: %d folded adapters for %d problems (cache hit rate %.2f)",
                 cache.misses + cache.hits, len(test), cache.hit_rate)
        base = Path(manifest["base"])  # a folder (relative to the project), or a hub id
        base = project_root() / base if (project_root() / base).exists() else manifest["base"]
        server = stack.enter_context(VLLMServer(base, params.vllm, project_root(), "base",
                                                lora_rank=cache.max_lora_rank))
        return server, solver.template, adapters

    def run(on_batch, seed: int) -> None:
        server, template, adapters = requests()
        on_batch(0, *solve_served(server, template, prompts, adapters, s.max_new_tokens,
                                  temperature, seed))

    with contextlib.ExitStack() as stack:
        for seed in s.seeds:
            labels = [(solver, p.id, seed) for solver, _ in rows for p in test]
            runner.generate(labels, functools.partial(run, seed=seed),
                            chunk=f"served.seed{seed}", load=requests)


def customized(runner: Runner, test: list[Problem], experts_dir: Path, clusters_dir: Path,
               hypernet_dir: Path, s, temperature: float | None) -> None:
    """The hypernetwork's gated forward, through the same batched path."""
    from bdc.customize.solver import load
    from bdc.llm.system1 import solve

    labels, prompts = replicates("customized", test, s.seeds)

    @functools.cache
    def loaded():
        solver = load(hypernet_dir, experts_dir, clusters_dir)
        return solver, solver.z(prompts)

    def run(on_batch) -> None:
        solver, z = loaded()
        solve(solver.model, solver.tokenizer, solver.template, prompts, s.max_new_tokens,
              s.batch, temperature=temperature, seed=s.seeds[0], z=z, on_batch=on_batch)

    runner.generate(labels, run, chunk="solver.customized", load=loaded)


def arrow(runner: Runner, test: list[Problem], experts_dir: Path, manifest: dict,
          params: Params, temperature: float | None) -> None:
    """Arrow's training-free per-token routing over the experts."""
    from bdc.disentangle.merging import arrow_model
    from bdc.llm.system1 import solve, template_for

    s = params.evaluate

    @functools.cache
    def loaded():
        model, tokenizer = arrow_model(manifest["base"], [experts_dir / e for e in
                                                          manifest["experts"]],
                                       params.experts.arrow_top_k, params.seed)
        return model, tokenizer, template_for(tokenizer, manifest["template"])

    labels, prompts = replicates("arrow", test, s.seeds)
    runner.generate(labels, lambda cb: solve(
        *loaded(), prompts, s.max_new_tokens, s.batch, temperature=temperature,
        seed=s.seeds[0], on_batch=cb), chunk="solver.arrow", load=loaded)


@dataclass
class Evaluation:
    """Every solver's programs scored, the table's rows, the claims and the table's order."""

    outcomes: list
    result: dict
    claims: dict
    order: list[str]
    reused: list[str]  # the System-1 chunks restored from an earlier run's kept work


# the code that makes evaluate's programs and scores, in the keys of its kept work (not the
# table's statistics or the claims: a change there re-tabulates, it never regenerates)
SYSTEM1_CODE = ("evaluate/runner.py", "evaluate/solvers.py", "llm", "customize", "disentangle",
                "sandbox", "problems/format.py")
SYSTEM2_CODE = ("evaluate/system2.py", "evaluate/runner.py", "llm", "boost", "sandbox",
                "problems/format.py")


def finished_dirs(params: Params, test: list[Problem], experts_dir: Path, clusters_dir: Path,
                  hypernet_dir: Path, manifest: dict, root: Path) -> tuple[Path, Path]:
    """Where the System-1 and the System-2 work of this evaluation is kept as it finishes:
    folders under ``root`` named by a fingerprint of everything that made it (the problems,
    the experts, clusters and hypernetwork byte for byte, the base, the generation and
    sandbox settings, the code), so only the same evaluation ever resumes from them."""
    s = params.evaluate
    common = {"problems": [p.model_dump(mode="json") for p in test],
              "sandbox": params.sandbox.model_dump(mode="json")}
    system1 = {**common, "code": code_version(SYSTEM1_CODE),
               "experts": folder_digest(experts_dir), "clusters": folder_digest(clusters_dir),
               "hypernet": folder_digest(hypernet_dir), "base": identity(manifest["base"]),
               "generation": s.model_dump(mode="json", include={
                   "temperature", "max_new_tokens", "batch", "engine"}),
               "arrow": [params.experts.arrow_top_k, params.seed],
               "served": [params.vllm.model_dump(mode="json"),
                          params.customize.fold_precision] if s.engine == "vllm" else None}
    system2 = {**common, "code": code_version(SYSTEM2_CODE),
               # where problems are searched (explore.cluster) never changes what is found
               "explore": params.explore.model_dump(mode="json", exclude={"cluster"}),
               "agents": {n: identity(a.model) for n, a in params.explore.agents.items()}}
    return root / f"system1-{digest(system1)}", root / f"system2-{digest(system2)}"


def evaluate_all(params: Params, test: list[Problem], experts_dir: Path, clusters_dir: Path,
                 hypernet_dir: Path, manifest: dict, sandbox,
                 kept: tuple[Path, Path] | None = None) -> Evaluation:
    """Every System-1 solver (and, with ``evaluate.system2``, the System-2 trees) on the
    hidden tests of ``test``; the claims measured on the result. ``kept``: the folders of
    :func:`finished_dirs`, where finished work is kept and restored from (None: none)."""
    import torch

    s = params.evaluate
    experts = manifest["experts"]
    merges = [a for a in manifest["adapters"] if a.startswith("merge_")]
    home = home_clusters(clusters_dir)
    temperature = s.temperature or None
    groups = {p.id: group_of(p) for p in test}
    runner = Runner({p.id: p for p in test}, sandbox, kept[0] if kept else None)
    clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        log.info("evaluate: %s in %.1fs", name, time.perf_counter() - clock)
        clock = time.perf_counter()

    if s.engine == "vllm":
        served_solvers(runner, test, experts_dir, clusters_dir, hypernet_dir, manifest,
                       params, temperature)
        phase("adapter and customized solvers generated on vLLM")
    else:
        adapter_solvers(runner, test, experts_dir, manifest, s, temperature)
        phase("adapter solvers generated")
        customized(runner, test, experts_dir, clusters_dir, hypernet_dir, s, temperature)
        phase("customized solver generated")
    if len(experts) > 1:
        arrow(runner, test, experts_dir, manifest, params, temperature)
        phase("Arrow generated")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    outcomes = runner.finish()
    if home:
        outcomes += oracle_rows(outcomes, test, home)
    phase("programs scored")
    result = table(outcomes, groups, s.seeds, s.ks)
    problems = per_problem(outcomes)
    if s.system2:
        rows, searched = system2_rows(system2(params, test, s.system2_seeds or s.seeds,
                                              sandbox, kept[1] if kept else None), len(test))
        result.update(rows)
        problems.update(searched)
        phase("System-2 searched")
    routes = dict(zip([p.id for p in test], route(test, clusters_dir).tolist(), strict=True))
    measured = claims(result, experts, own_cluster(problems, routes, experts), problems)
    order = [BASE, FULL, *experts, "oracle expert", *merges, "arrow", "customized",
             *[n for n in result if n.startswith("System-2")]]
    return Evaluation(outcomes, result, measured, order, runner.reused)
