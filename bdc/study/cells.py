"""One cell of the study (a world, N records per cluster, an adapter capacity, a training
seed): its arms trained, every test problem solved by each arm under each decoding seed and
scored on its hidden tests, and each arm's per-problem strict accuracy kept.

Arms (docs/study.md): ``full`` (all records, the experts' summed steps); ``oracle`` (each
problem's family's home expert); ``oracle_long`` (the same experts, each trained for the
full LoRA's steps); ``oracle_warm`` (each expert started from the full-data LoRA's weights
and trained on its cluster for its expert's steps: ELREA's warm start); ``subset`` (the home
cluster's size-matched random subset, its expert's steps); and over the cross-fitted
experts (half of each cluster's problems): ``uniform`` (the untrained hypernetwork),
``centroid`` (training-free, temperature chosen on the validation records), ``customized``
(the hypernetwork trained on the other half, the best epoch on the validation records kept)
and ``shared`` (the same with the half-data full LoRA as one more expert). Work is kept in
the cell's folder as it finishes; a cell resumes there.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bdc.config import Params
from bdc.disentangle.experts import BASE_ADAPTER
from bdc.evaluate.runner import Runner
from bdc.evaluate.table import per_problem
from bdc.jsonl import atomic_open
from bdc.problems.format import Problem
from bdc.reuse import code_version, digest, identity
from bdc.study.arms import (
    STUDY_CODE,
    AdapterPlan,
    CentroidRouter,
    expert_steps,
    mean_loss,
    settings_for,
    train_adapters,
)
from bdc.study.data import (
    EXPLORED,
    World,
    at_n,
    halves,
    records_digest,
    subset,
    world_label,
)

log = logging.getLogger(__name__)
CELL_CODE = (*STUDY_CODE, "study/cells.py", "study/data.py", "customize", "llm/system1.py",
             "evaluate/runner.py", "sandbox")
MIXTURES = ("uniform", "centroid", "customized", "shared")


@dataclass(frozen=True)
class Cell:
    world: str
    n: int | str
    capacity: str
    seed: int
    k: int | None = None  # clusters; None: the silhouette's choice (the pipeline's)

    @property
    def label(self) -> str:
        """The world as clustered: ``mini``, or ``mini-k3`` at a fixed k."""
        return world_label(self.world, self.k)

    @property
    def key(self) -> str:
        return f"{self.label}/N={self.n}/{self.capacity}/seed{self.seed}"


def plans(records: dict[int, list[dict]], cell: Cell, params: Params, arms: list[str]
          ) -> list[AdapterPlan]:
    """The adapters a cell's arms need, with their step budgets (docs/study.md)."""
    s, settings = params.study, params.experts

    def steps(n: int) -> int:
        return expert_steps(n, settings, s.epochs, s.max_expert_steps)

    every = [r for c in sorted(records) for r in records[c]]
    full = sum(steps(len(records[c])) for c in records)
    out = [AdapterPlan("full", every, full)] if "full" in arms else []
    if "oracle" in arms:
        out += [AdapterPlan(f"expert_{c}", records[c], steps(len(records[c])))
                for c in records]
    if "oracle_long" in arms and len(every) <= s.long_experts_up_to:
        out += [AdapterPlan(f"long_{c}", records[c], full) for c in records]
    if "subset" in arms:
        out += [AdapterPlan(f"subset_{c}", subset(records, c, cell.seed),
                            steps(len(records[c]))) for c in records]
    if set(MIXTURES) & set(arms):
        half, _ = halves(records, cell.seed)
        out += [AdapterPlan(f"half_{c}", half[c], steps(len(half[c]))) for c in half]
        if "shared" in arms:
            out.append(AdapterPlan("half_full", [r for c in sorted(half) for r in half[c]],
                                   sum(steps(len(half[c])) for c in half)))
    if "oracle_warm" in arms:  # each expert starts from the full-data LoRA (ELREA's design);
        # last, so the other adapters keep their place (their initialisation seed)
        out += [AdapterPlan(f"warm_{c}", records[c], steps(len(records[c])), init_from="full")
                for c in records]
    return out


def cell_folder(root: Path, cell: Cell, world: World, records: dict[int, list[dict]],
                params: Params, temperature: float) -> Path:
    """The cell's folder, named by everything that makes its results."""
    print_ = digest({"cell": asdict(cell), "records": records_digest(records),
                     "validation": records_digest(world.validation_records),
                     "test": [p.model_dump(mode="json") for p in world.test],
                     "base": identity(world.base), "temperature": temperature,
                     # the study's settings that make a cell (not which cells there are)
                     "study": params.study.model_dump(mode="json", exclude={
                         "out", "worlds", "records_per_cluster", "training_seeds",
                         "primary_seeds", "capacities"}),
                     "capacity": params.study.capacities[cell.capacity].model_dump(),
                     "experts": params.experts.model_dump(mode="json"),
                     "customize": params.customize.model_dump(mode="json"),
                     "sandbox": params.sandbox.model_dump(mode="json"),
                     "code": code_version(CELL_CODE)})
    name = f"{cell.label}-n{cell.n}-{cell.capacity}-s{cell.seed}-{print_[:12]}"
    return root / name


def home_adapter(problem: Problem, home: dict[str, int], prefix: str) -> str:
    family = problem.meta.get("family")
    return f"{prefix}_{home[family]}" if family in home else BASE_ADAPTER


def choose_temperature(experts, world: World, params: Params, sandbox, folder: Path
                       ) -> dict:
    """The decoding temperature, chosen on the validation problems with the full-data LoRA
    (the best mean strict accuracy over the decoding seeds; ties go to the lower)."""
    from bdc.llm.system1 import solve

    s = params.study
    runner = Runner({p.id: p for p in world.validation}, sandbox, folder / "validation")
    prompts = [p.prompt for _ in s.decode_seeds for p in world.validation]
    for t in s.temperatures:
        labels = [(f"full@{t}", p.id, seed) for seed in s.decode_seeds
                  for p in world.validation]
        runner.generate(labels, lambda cb, t=t: solve(
            experts.peft, experts.tokenizer, experts.template, prompts,
            params.experts.max_new_tokens, params.evaluate.batch,
            adapter_names=["full"] * len(prompts), temperature=t or None,
            seed=s.decode_seeds[0], on_batch=cb), chunk=f"full@{t}")
    scores = {name: sum(v.values()) / len(v)
              for name, v in per_problem(runner.finish()).items()}
    chosen = min(s.temperatures, key=lambda t: (-scores[f"full@{t}"], t))
    return {"temperature": chosen, "validation_strict": scores}


def run_cell(world: World, cell: Cell, params: Params, temperature: float | None, sandbox,
             root: Path, on_progress=None) -> dict:
    """The cell's result: each arm's per-problem strict accuracy (x100, mean over the
    decoding seeds), the adapters' steps and seconds, the router's record; kept in the
    cell's folder and restored from there when nothing that made it changed."""
    from bdc.customize.solver import build
    from bdc.customize.training import rows, train
    from bdc.disentangle.experts import device_and_dtype
    from bdc.llm.system1 import solve

    s = params.study
    records = at_n(world.explored, world.reference, cell.n)
    folder = cell_folder(root, cell, world, records, params, temperature)
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    started = time.perf_counter()
    settings = settings_for(params.experts, s.capacities[cell.capacity])
    experts, trained = train_adapters(world.base, settings, plans(records, cell, params,
                                                                   s.arms),
                                      cell.seed, folder / "adapters", on_progress)
    chosen = None
    if temperature is None:
        chosen = choose_temperature(experts, world, params, sandbox, folder)
        temperature = chosen["temperature"]
    test, seeds = world.test, s.decode_seeds
    runner = Runner({p.id: p for p in test}, sandbox, folder / "chunks")
    prompts = [p.prompt for _ in seeds for p in test]

    def labels(arm: str) -> list[tuple[str, str, int]]:
        return [(arm, p.id, seed) for seed in seeds for p in test]

    generation = {"max_new_tokens": params.experts.max_new_tokens,
                  "batch_size": params.evaluate.batch, "temperature": temperature or None,
                  "seed": seeds[0]}
    adapter_arms = {"base": lambda p: BASE_ADAPTER, "full": lambda p: "full",
                    "oracle": lambda p: home_adapter(p, world.home, "expert"),
                    "subset": lambda p: home_adapter(p, world.home, "subset"),
                    "oracle_warm": lambda p: home_adapter(p, world.home, "warm")}
    if "long_0" in trained:
        adapter_arms["oracle_long"] = lambda p: home_adapter(p, world.home, "long")
    for arm, adapter_of in adapter_arms.items():
        if arm not in s.arms:
            continue
        names = [adapter_of(p) for _ in seeds for p in test]
        runner.generate(labels(arm), lambda cb, names=names: solve(
            experts.peft, experts.tokenizer, experts.template, prompts,
            adapter_names=names, on_batch=cb, **generation), chunk=arm)
    k = len(records)
    halves_ = [f"half_{c}" for c in sorted(records)]
    device, dtype = device_and_dtype(settings)
    _, router_records = halves(records, cell.seed)
    cs = params.customize.model_copy(update={"epochs": s.router_epochs, "seed": cell.seed,
                                             "patience": s.router_patience})
    info: dict = {}

    def trained_router(names: list[str], tag: str):
        """A hypernetwork over ``names``, seeded before it is built, trained on the router
        half and early-stopped on the validation records."""
        solver = build(world.base, folder / "adapters", names, world.clusters_dir, "all",
                       None, cs.hidden, cs.normalisation, settings.template, device, dtype,
                       seed=cell.seed)
        problems = {r["problem_id"]: r["prompt"] for r in
                    [*router_records, *world.validation_records]}
        z = dict(zip(problems, solver.z(list(problems.values())), strict=True))
        tok, length = solver.tokenizer, settings.max_length
        train_rows = rows(router_records, tok, solver.template, length, z)
        val_rows = rows(world.validation_records, tok, solver.template, length, z)
        info[f"{tag}_initial_val_loss"] = mean_loss(solver.model, val_rows, tok.pad_token_id)
        return solver, train_rows, val_rows, folder / ".work" / tag

    @functools.cache
    def mixture():
        solver, train_rows, val_rows, work = trained_router(halves_, "customized")
        uniform_router = solver.model.router
        losses = {}
        for t in s.centroid_temperatures:
            solver.model.router = CentroidRouter(solver.model.config, t)
            losses[t] = mean_loss(solver.model, val_rows, solver.tokenizer.pad_token_id)
        best = min(losses, key=losses.get)
        centroid = CentroidRouter(solver.model.config, best)
        info["centroid"] = {"temperature": best, "val_loss": losses}
        solver.model.router = uniform_router
        return solver, train_rows, val_rows, work, uniform_router, centroid

    def mixed(cb, router_of) -> None:
        solver = mixture()[0]
        solver.model.router = router_of()
        solve(solver.model, solver.tokenizer, solver.template, prompts, z=solver.z(prompts),
              on_batch=cb, **generation)

    if "uniform" in s.arms:
        runner.generate(labels("uniform"), lambda cb: mixed(cb, lambda: mixture()[4]),
                        chunk="uniform", load=mixture)
    if "centroid" in s.arms:
        runner.generate(labels("centroid"), lambda cb: mixed(cb, lambda: mixture()[5]),
                        chunk="centroid", load=mixture)

    @functools.cache
    def customized():
        solver, train_rows, val_rows, work, uniform_router, _ = mixture()
        solver.model.router = copy.deepcopy(uniform_router)  # the uniform arm keeps its own
        info["customized"] = _router_record(train(solver.model, train_rows, val_rows, cs,
                                                  solver.tokenizer.pad_token_id, work))
        return solver.model.router

    if "customized" in s.arms:
        runner.generate(labels("customized"), lambda cb: mixed(cb, customized),
                        chunk="customized", load=customized)

    @functools.cache
    def shared():
        solver, train_rows, val_rows, work = trained_router([*halves_, "half_full"], "shared")
        info["shared"] = _router_record(train(solver.model, train_rows, val_rows, cs,
                                              solver.tokenizer.pad_token_id, work))
        return solver

    def shared_run(cb) -> None:
        solver = shared()
        solve(solver.model, solver.tokenizer, solver.template, prompts, z=solver.z(prompts),
              on_batch=cb, **generation)

    if "shared" in s.arms:
        runner.generate(labels("shared"), shared_run, chunk="shared", load=shared)
    outcomes = runner.finish()
    result = {"cell": asdict(cell), "key": cell.key, "temperature": temperature,
              "temperature_choice": chosen, "experts": k,
              "records": {str(c): {"records": len(v),
                                   "explored": sum(r["origin"] == EXPLORED for r in v)}
                          for c, v in records.items()},
              "router_records": len(router_records),
              "adapters": {n: {key: r[key] for key in ("records", "steps", "train_seconds",
                                                       "reused")}
                           for n, r in trained.items()},
              "routers": info, "arms": per_problem(outcomes),
              "tokens": {arm: sum(o.tokens for o in outcomes if o.solver == arm) / len(seeds)
                         for arm in {o.solver for o in outcomes}},
              "seconds": round(time.perf_counter() - started, 1)}
    with atomic_open(result_path) as f:
        json.dump(result, f, indent=1)
    return result


def _router_record(record: dict) -> dict:
    return {key: record[key] for key in ("train_records", "val_records", "steps",
                                         "max_steps", "epochs", "plateaued",
                                         "initial_val_loss", "best_epoch", "best_val_loss",
                                         "val_losses", "train_seconds")}
