"""Stage ``experts`` (DisenLoRA, part 2): one LoRA expert per cluster and one on all the data,
the static merges and Arrow, a quick competence check, and the expert set in the registry.

GPU stage in the paper profile (``orchestration.gpu_stages``), CPU in the mini profile. Reads
only validated data (``report.json``) and the clusters; the base model is referenced, never
copied into the outputs.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from bdc.config import Params
from bdc.disentangle.experts import FULL, ExpertSet, expert_name, train_all
from bdc.jsonl import atomic_open, details_path, read_jsonl, write_metrics
from bdc.problems.format import Problem, read_problems
from bdc.runtime import state_dir

log = logging.getLogger(__name__)
BASE = "__base__"

# the numbers `dvc metrics show` shows; all of them go to data/metrics/details/
HEADLINE = ("competence.full.mean", "competence.expert.mean")



def datasets(records: list[dict], assignments: list[dict]) -> dict[str, list[dict]]:
    """``full``: every record; ``cluster_k``: the records of cluster k."""
    cluster = {(a["problem_id"], a["task"]): a["cluster"] for a in assignments}
    out: dict[str, list[dict]] = {FULL: records}
    by: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by[cluster[(r["problem_id"], r["task"])]].append(r)
    for k in sorted(by):
        out[expert_name(k)] = by[k]
    return out


def route(problems: list[Problem], clusters_dir: Path) -> np.ndarray:
    """Each problem's nearest centroid, from its text alone (the saved embedder)."""
    from bdc.disentangle.clustering import assign
    from bdc.disentangle.embedding import Embedder, EmbedderSpec

    embedder = json.loads((clusters_dir / "embedder.json").read_text())
    spec = EmbedderSpec(embedder["model"], embedder["trust_remote_code"])
    centroids = np.load(clusters_dir / "centroids.npy")
    return assign(Embedder(spec).embed([p.prompt for p in problems]), centroids)


def competence(experts: ExpertSet, test: list[Problem], routes: np.ndarray, k: int,
               sandbox, per_cluster: int) -> dict:
    """Pass@1 (greedy, all hidden tests) on a held-out slice per cluster: the base, the
    full-data LoRA and the cluster's expert, in one mixed-adapter batch. A quick look,
    decided on by nothing: the full comparison (merges and Arrow too) is evaluate's."""
    from bdc.scoring import solved
    from bdc.system1 import solve

    s = experts.settings
    table: dict[str, dict[str, float]] = defaultdict(dict)
    rows = []  # (solver kind, cluster, adapter, problem), every cluster in one batch
    for c in range(k):
        chosen = [p for p, r in zip(test, routes.tolist(), strict=True) if r == c][:per_cluster]
        rows += [(kind, c, adapter, p) for kind, adapter in
                 (("base", BASE), ("full", FULL), ("expert", expert_name(c))) for p in chosen]
    outs = solve(experts.peft, experts.tokenizer, experts.template,
                 [p.prompt for *_, p in rows], s.max_new_tokens, s.generate_batch,
                 adapter_names=[adapter for _, _, adapter, _ in rows])
    ok = solved([p for *_, p in rows], [program for _, program in outs], sandbox)
    for kind, c in {(kind, c) for kind, c, _, _ in rows}:
        mine = [good for (who, cl, _, _), good in zip(rows, ok, strict=True)
                if who == kind and cl == c]
        table[kind][str(c)] = float(np.mean(mine))
    return {solver: {"by_cluster": dict(sorted(row.items())),
                     "mean": float(np.mean(list(row.values())))}
            for solver, row in table.items()}


def run(params: Params, explore_dir: Path, validate_dir: Path, clusters_dir: Path,
        problems_dir: Path, out_dir: Path, metrics_path: Path, plots_dir: Path,
        on_progress=None) -> dict:
    """The stage with its MLflow run and the registered expert set."""
    from bdc.disentangle.merging import merge
    from bdc.disentangle.registry import register
    from bdc.plots import line_figure, save_png
    from bdc.sandbox import Sandbox
    from bdc.stages.validate import REPORT, require_validated
    from bdc.tracking import stage_run

    s = params.experts
    sft = explore_dir / "sft.jsonl"
    require_validated(validate_dir / REPORT, sft)
    data = datasets(list(read_jsonl(sft, dict)), list(read_jsonl(
        clusters_dir / "assignments.jsonl", dict)))
    k = len(data) - 1
    experts_names = [expert_name(c) for c in range(k)]
    with stage_run("experts", {"experts": s.model_dump(), "seed": params.seed},
                   params.profile) as tracked:
        tracked.dataset(explore_dir / "sft.jsonl", "SFT records", "training")
        experts = ExpertSet(s.base, s, s.template)
        loss_rows: list[dict] = []

        def on_log(name: str, step: int, loss: float) -> None:
            loss_rows.append({"adapter": name, "step": step, "loss": loss})
            tracked.metrics({f"loss.{name}": loss}, step=step)

        records = train_all(experts, data, out_dir, state_dir() / "experts", on_log,
                            on_progress)
        for name, spec in s.merges.items():
            merge(experts.peft, experts_names, f"merge_{name}", spec)
            experts.save(f"merge_{name}", out_dir / f"merge_{name}", {
                "merge.json": json.dumps({"experts": experts_names, **spec.model_dump()})})
        test = read_problems(problems_dir / "test.jsonl")
        routes = route(test, clusters_dir)
        with Sandbox(params.sandbox) as sandbox:
            check = competence(experts, test, routes, k, sandbox, s.check_per_cluster)
        metrics = {"adapters": {name: {key: r[key] for key in
                                       ("records", "steps", "train_seconds", "reused",
                                        "trainable_parameters")}
                                | {"final_loss": r["losses"][-1][1] if r["losses"] else None}
                                for name, r in records.items()},
                   "k": k, "competence": check,
                   "train_seconds": round(sum(r["train_seconds"] for r in records.values()
                                              if not r["reused"]), 1)}
        write_metrics(metrics_path, metrics, HEADLINE)
        with atomic_open(plots_dir / "experts_loss.csv") as f:
            f.write("adapter,step,loss\n" + "".join(
                f"{r['adapter']},{r['step']},{r['loss']:.4f}\n" for r in loss_rows))
        tracked.artifact(save_png(line_figure(loss_rows, "adapter", title="training loss per "
                                              "adapter"), plots_dir / "experts_loss.png"))
        tracked.metrics({key: value for key, value in metrics.items() if key != "adapters"})
        tracked.metrics({"adapters": metrics["adapters"]})
        manifest = {"base": s.base, "template": experts.template.name,
                    "adapters": [FULL, *experts_names, *[f"merge_{m}" for m in s.merges]],
                    "experts": experts_names, "lora": s.lora.model_dump(),
                    "embedder": json.loads((clusters_dir / "embedder.json").read_text())}
        version = register(out_dir, manifest, {"centroids": clusters_dir / "centroids.npy"})
        tracked.tag("bdc.registered_model", f"models:/bdc-experts/{version}")
        metrics["registered_version"] = version
        tracked.artifact(details_path(metrics_path))
    return metrics
