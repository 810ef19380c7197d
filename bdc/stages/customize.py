"""Stage ``customize`` (part C): the input-aware hypernetwork over the experts, trained on the
validated SFT data with base and experts frozen; routing diagnostics (is it routing, or
averaging?), the folded-adapter cache's hit rate on the test problems, and the whole solver
in the MLflow registry. GPU stage in the paper profile, CPU in the mini profile.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bdc import artifacts
from bdc.config import Params
from bdc.jsonl import atomic_open, details_path, read_jsonl, write_metrics
from bdc.llm.packaged import ensure
from bdc.problems.format import read_problems
from bdc.runtime import state_dir

# the numbers `dvc metrics show` shows; all of them go to data/metrics/details/
HEADLINE = ("best_val_loss", "own_expert_weight")



def run(params: Params, explore_dir: Path, validate_dir: Path, clusters_dir: Path,
        experts_dir: Path, problems_dir: Path, out_dir: Path, metrics_path: Path,
        plots_dir: Path) -> dict:
    """The stage with its MLflow run and the registered customized solver."""
    import torch

    from bdc.customize.diagnostics import diagnostics, weights_figure
    from bdc.customize.fold import FoldedCache
    from bdc.customize.registry import register_solver
    from bdc.customize.solver import build
    from bdc.customize.training import train_or_reuse
    from bdc.disentangle.experts import device_and_dtype
    from bdc.disentangle.routing import require_same_clusters
    from bdc.plots import line_figure, save_png
    from bdc.tracking import stage_run
    from bdc.validation.report import require_validated

    s = params.customize
    sft = explore_dir / artifacts.SFT
    require_validated(validate_dir / artifacts.REPORT, sft)
    records = list(read_jsonl(sft, dict))
    manifest = json.loads((experts_dir / artifacts.MANIFEST).read_text())
    require_same_clusters(manifest, experts_dir, clusters_dir)
    experts = manifest["experts"]
    cluster_of = {r["problem_id"]: r["cluster"]
                  for r in read_jsonl(clusters_dir / artifacts.CLUSTER_PROBLEMS, dict)}
    device, dtype = device_and_dtype(params.experts)
    ensure(params)  # the packaged real models its settings name, converted once
    with stage_run("customize", {"customize": s.model_dump(), "seed": params.seed},
                   params.profile, doc=__doc__) as tracked:
        tracked.dataset(explore_dir / artifacts.SFT, "SFT records", "training")
        solver = build(params.experts.base, experts_dir, experts, clusters_dir, s.layers,
                       s.projections, s.hidden, s.normalisation, params.experts.template,
                       device, dtype, seed=s.seed)
        problems = sorted({r["problem_id"] for r in records})
        prompts = {r["problem_id"]: r["prompt"] for r in records}
        z = dict(zip(problems, solver.z([prompts[p] for p in problems]), strict=True))

        def on_log(name: str, step: int, loss: float) -> None:
            tracked.metrics({f"loss.{name}": loss}, step=step)

        record = train_or_reuse(solver, records, z, params, experts_dir, experts,
                                clusters_dir, out_dir, state_dir() / "customize", on_log)
        print_ = record["fingerprint"]
        k = len(experts)
        diag = diagnostics(solver, np.stack([z[p] for p in problems]),
                           [cluster_of[p] for p in problems], k)
        test = read_problems(problems_dir / artifacts.pool("test"))
        cache = FoldedCache(solver.model, state_dir() / "cache" / "folded" / print_,
                            params.experts.base, s.fold_precision)
        for row in solver.z([p.prompt for p in test]):
            cache.adapter(torch.as_tensor(row[None]))
        metrics = {"reused": record["reused"], "steps": record.get("steps"),
                   "train_seconds": record.get("train_seconds"),
                   "epochs": record.get("epochs"), "plateaued": record.get("plateaued"),
                   "best_epoch": record.get("best_epoch"),
                   "best_val_loss": record.get("best_val_loss"),
                   "initial_val_loss": record.get("initial_val_loss"),
                   "experts": k, "rank": solver.model.config.rank,
                   "adapted_modules": len(solver.model.config.modules),
                   "fold_cache_hit_rate": cache.hit_rate, "folded_adapters": cache.misses,
                   "vllm_max_lora_rank": cache.max_lora_rank, **diag}
        write_metrics(metrics_path, metrics, HEADLINE)
        with atomic_open(plots_dir / "customize_loss.csv") as f:
            f.write("series,step,loss\n" + "".join(
                f"train,{step},{loss:.4f}\n" for step, loss in record.get("losses", []))
                + "".join(f"val,{step},{loss:.4f}\n" for step, loss in record["val_steps"]))
        curves = [{"series": "train (per step)", "step": step, "loss": loss}
                  for step, loss in record.get("losses", [])] + \
                 [{"series": "validation (each epoch's end)", "step": step, "loss": loss}
                  for step, loss in record["val_steps"]]
        tracked.artifact(save_png(line_figure(curves, "series", title="hypernetwork loss"),
                                  plots_dir / "customize_loss.png"))
        tracked.metrics({key: v for key, v in metrics.items()
                         if key != "mean_weight_by_cluster"})
        tracked.figure(weights_figure(diag["mean_weight_by_cluster"], k),
                       "expert_weights.png")
        tracked.artifact(details_path(metrics_path))
        version = register_solver(out_dir, experts_dir, clusters_dir)
        tracked.tag("bdc.registered_model", f"models:/bdc-solver/{version}")
        metrics["registered_version"] = version
    return metrics
