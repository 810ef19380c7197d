"""Stage ``experts`` (DisenLoRA, part 2): one LoRA expert per cluster and one on all the data,
the static merges and Arrow, a quick competence check, and the expert set in the registry.

GPU stage in the paper profile (``orchestration.gpu_stages``), CPU in the mini profile. Reads
only validated data (``report.json``) and the clusters; the base model is referenced, never
copied into the outputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bdc import artifacts
from bdc.config import Params
from bdc.disentangle.experts import (
    FULL,
    ExpertSet,
    competence,
    datasets,
    expert_name,
    train_all,
)
from bdc.disentangle.routing import clusters_of, route
from bdc.jsonl import atomic_open, details_path, read_jsonl, write_metrics
from bdc.llm.packaged import ensure
from bdc.problems.format import read_problems
from bdc.runtime import state_dir

log = logging.getLogger(__name__)

# the numbers `dvc metrics show` shows; all of them go to data/metrics/details/
HEADLINE = ("competence.full.mean", "competence.expert.mean")



def run(params: Params, explore_dir: Path, validate_dir: Path, clusters_dir: Path,
        problems_dir: Path, out_dir: Path, metrics_path: Path, plots_dir: Path,
        on_progress=None) -> dict:
    """The stage with its MLflow run and the registered expert set."""
    from bdc.disentangle.merging import merge
    from bdc.disentangle.registry import register
    from bdc.plots import line_figure, save_png
    from bdc.sandbox import Sandbox
    from bdc.tracking import stage_run
    from bdc.validation.report import require_validated

    s = params.experts
    sft = explore_dir / artifacts.SFT
    require_validated(validate_dir / artifacts.REPORT, sft)
    data = datasets(list(read_jsonl(sft, dict)), list(read_jsonl(
        clusters_dir / artifacts.ASSIGNMENTS, dict)))
    k = len(data) - 1
    experts_names = [expert_name(c) for c in range(k)]
    ensure(params)  # the packaged real models its settings name, converted once
    with stage_run("experts", {"experts": s.model_dump(), "seed": params.seed},
                   params.profile, doc=__doc__) as tracked:
        tracked.dataset(explore_dir / artifacts.SFT, "SFT records", "training")
        experts = ExpertSet(s.base, s, s.template)

        def on_log(name: str, step: int, loss: float) -> None:
            tracked.metrics({f"loss.{name}": loss}, step=step)

        records = train_all(experts, data, out_dir, state_dir() / "experts", on_log,
                            on_progress)
        # from the training records, reused adapters' too (a run that reused every adapter
        # wrote the loss table as a header alone)
        loss_rows = [{"adapter": name, "step": step, "loss": loss}
                     for name, r in records.items() for step, loss in r["losses"]]
        for name, spec in s.merges.items():
            merge(experts.peft, experts_names, f"merge_{name}", spec, s.seed)
            experts.save(f"merge_{name}", out_dir / f"merge_{name}", {
                "merge.json": json.dumps({"experts": experts_names, **spec.model_dump()})})
        test = read_problems(problems_dir / artifacts.pool("test"))
        routes = route(test, clusters_dir)
        with Sandbox(params.sandbox) as sandbox:
            check = competence(experts, test, routes, k, sandbox, s.check_per_cluster)
        metrics = {"adapters": {name: {key: r[key] for key in
                                       ("records", "rows", "steps", "train_seconds",
                                        "reused", "trainable_parameters")}
                                | {"final_loss": r["losses"][-1][1] if r["losses"] else None}
                                for name, r in records.items()},
                   # sorted: competence() fills it in a set's order, which changed the file
                   # (not its numbers) from run to run
                   "k": k, "competence": dict(sorted(check.items())),
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
                    "embedder": json.loads((clusters_dir / artifacts.EMBEDDER).read_text()),
                    "clusters": clusters_of(clusters_dir)}
        version = register(out_dir, manifest, {"centroids": clusters_dir / artifacts.CENTROIDS})
        tracked.tag("bdc.registered_model", f"models:/bdc-experts/{version}")
        metrics["registered_version"] = version
        tracked.artifact(details_path(metrics_path))
    return metrics
