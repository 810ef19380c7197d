"""Stage ``customize`` (part C): the input-aware hypernetwork over the experts, trained on the
validated SFT data with base and experts frozen; routing diagnostics (is it routing, or
averaging?), the folded-adapter cache's hit rate on the test problems, and the whole solver
in the MLflow registry. GPU stage in the paper profile, CPU in the mini profile.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from bdc.config import Params
from bdc.jsonl import atomic_open, details_path, read_jsonl, write_metrics
from bdc.problems.format import read_problems
from bdc.runtime import state_dir

TRAINING_RECORD = "training.json"

# the numbers `dvc metrics show` shows; all of them go to data/metrics/details/
HEADLINE = ("best_val_loss", "own_expert_weight")



def fingerprint(params: Params, experts_dir: Path, experts: list[str], clusters_dir: Path,
                records: list[dict]) -> str:
    trained = {n: json.loads((experts_dir / n / "training.json").read_text())["fingerprint"]
               for n in experts}
    blob = json.dumps({
        "experts": trained, "settings": params.customize.model_dump(),
        "template": params.experts.template, "base": params.experts.base,
        "centroids": hashlib.sha256((clusters_dir / "centroids.npy").read_bytes()).hexdigest(),
        "embedder": json.loads((clusters_dir / "embedder.json").read_text())["identity"],
        "data": hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()},
        sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def diagnostics(solver, z: np.ndarray, clusters: list[int], k: int) -> dict:
    """Each expert's mean weight per cluster of the inputs (1/K each: the uniform merge) and
    the entropy of the weights over experts (1 = averaging, 0 = one expert per component)."""
    import torch

    with torch.no_grad():
        zt = torch.as_tensor(z)
        weights = solver.model.router.expert_weights(zt).cpu().numpy()  # (n, K)
        gates = torch.stack(list(solver.model.router(zt).values()), 0)  # (m, n, K*r)
    r = solver.model.config.r
    p = gates.view(gates.shape[0], gates.shape[1], k, r)
    p = p / p.sum(dim=2, keepdim=True).clamp_min(1e-12)
    entropy = float((-(p * p.clamp_min(1e-12).log()).sum(2)).mean() / np.log(k)) if k > 1 \
        else 0.0
    by = defaultdict(list)
    for c, w in zip(clusters, weights, strict=True):
        by[c].append(w)
    per_cluster = {str(c): [round(float(x), 4) for x in np.mean(ws, 0)]
                   for c, ws in sorted(by.items())}
    own = [per_cluster[str(c)][c] for c in range(k) if str(c) in per_cluster]
    return {"normalised_entropy": entropy, "mean_weight_by_cluster": per_cluster,
            "own_expert_weight": float(np.mean(own)) if own else None}


def weights_figure(table: dict, k: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(table, key=int)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * k, 1 + 0.5 * len(rows)))
    image = ax.imshow([table[c] for c in rows], cmap="viridis")
    ax.set_xticks(range(k), [f"expert {i}" for i in range(k)], rotation=45)
    ax.set_yticks(range(len(rows)), [f"cluster {c}" for c in rows])
    ax.set_title("mean expert weight per input cluster")
    fig.colorbar(image)
    fig.tight_layout()
    return fig


def run(params: Params, explore_dir: Path, validate_dir: Path, clusters_dir: Path,
        experts_dir: Path, problems_dir: Path, out_dir: Path, metrics_path: Path,
        plots_dir: Path) -> dict:
    """The stage with its MLflow run and the registered customized solver."""
    import torch

    from bdc.customize.fold import FoldedCache
    from bdc.customize.registry import register_solver
    from bdc.customize.solver import build
    from bdc.customize.training import rows, split, train
    from bdc.disentangle.experts import device_and_dtype
    from bdc.plots import line_figure, save_png
    from bdc.stages.validate import REPORT, require_validated
    from bdc.tracking import stage_run

    s = params.customize
    sft = explore_dir / "sft.jsonl"
    require_validated(validate_dir / REPORT, sft)
    records = list(read_jsonl(sft, dict))
    experts = json.loads((experts_dir / "manifest.json").read_text())["experts"]
    cluster_of = {r["problem_id"]: r["cluster"]
                  for r in read_jsonl(clusters_dir / "problems.jsonl", dict)}
    device, dtype = device_and_dtype(params.experts)
    with stage_run("customize", {"customize": s.model_dump(), "seed": params.seed},
                   params.profile) as tracked:
        tracked.dataset(explore_dir / "sft.jsonl", "SFT records", "training")
        solver = build(params.experts.base, experts_dir, experts, clusters_dir, s.layers,
                       s.projections, s.hidden, s.normalisation, params.experts.template,
                       device, dtype)
        problems = sorted({r["problem_id"] for r in records})
        prompts = {r["problem_id"]: r["prompt"] for r in records}
        z = dict(zip(problems, solver.z([prompts[p] for p in problems]), strict=True))
        print_ = fingerprint(params, experts_dir, experts, clusters_dir, records)
        try:
            record = json.loads((out_dir / TRAINING_RECORD).read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("fingerprint") == print_:
            solver.model.load(out_dir)
            record["reused"] = True
        else:
            torch.manual_seed(s.seed)
            train_records, val_records = split(records, s.validation_share, s.seed)
            tok = solver.tokenizer
            length = params.experts.max_length
            work = state_dir() / "customize" / print_

            def on_log(name: str, step: int, loss: float) -> None:
                tracked.metrics({f"loss.{name}": loss}, step=step)

            record = {"fingerprint": print_, **train(
                solver.model, rows(train_records, tok, solver.template, length, z),
                rows(val_records, tok, solver.template, length, z), s, tok.pad_token_id,
                work, on_log)}
            tmp = Path(tempfile.mkdtemp(prefix=".hypernet.", dir=out_dir.parent))
            solver.save(tmp)
            (tmp / TRAINING_RECORD).write_text(json.dumps(record))
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)
            shutil.rmtree(work, ignore_errors=True)
            record["reused"] = False
        k = len(experts)
        diag = diagnostics(solver, np.stack([z[p] for p in problems]),
                           [cluster_of[p] for p in problems], k)
        test = read_problems(problems_dir / "test.jsonl")
        cache = FoldedCache(solver.model, state_dir() / "cache" / "folded" / print_,
                            params.experts.base, s.fold_precision)
        for row in solver.z([p.prompt for p in test]):
            cache.adapter(torch.as_tensor(row[None]))
        metrics = {"reused": record["reused"], "steps": record.get("steps"),
                   "train_seconds": record.get("train_seconds"),
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
                + "".join(f"val,{epoch},{loss:.4f}\n"
                          for epoch, loss in record.get("val_losses", [])))
        curves = [{"series": "train (per step)", "step": step, "loss": loss}
                  for step, loss in record.get("losses", [])] + \
                 [{"series": "validation (per epoch)", "step": epoch, "loss": loss}
                  for epoch, loss in record.get("val_losses", [])]
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
