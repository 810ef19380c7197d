"""Stage ``pretrain`` (mini profile): tiny agents and a System-1 base model, from scratch
(``bdc.llm.mini_models``), with their loss curves, competence table and calibration
targets to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from bdc.config import Params
from bdc.jsonl import atomic_open, details_path, write_metrics
from bdc.llm.mini_models import pretrain, targets
from bdc.plots import line_figure, save_png
from bdc.sandbox import Sandbox

# the numbers `dvc metrics show` shows; all of them go to data/metrics/details/
HEADLINE = ("boosting.composition_gain", "models.base.test.pass@1")



def competence_rows(metrics: dict) -> list[dict]:
    return [{"model": name, "split": split, "family": family, "pass@1": value}
            for name, m in metrics["models"].items() for split in ("explore", "test")
            for family, value in [*m[split]["by_family"].items(), ("all", m[split]["pass@1"])]]


def run(params: Params, problems_dir: Path, models_dir: Path, metrics_path: Path,
        plots_dir: Path, on_progress=None) -> dict:
    """The stage with its MLflow run: loss curves, competence table, targets."""
    from bdc.tracking import stage_run

    loss_rows: list[dict] = []
    with stage_run("pretrain", {"pretrain": params.pretrain.model_dump(),
                                "tiny_model": params.tiny_model.model_dump(),
                                "seed": params.seed}, params.profile, doc=__doc__) as tracked, \
            Sandbox(params.sandbox) as sandbox:

        def on_loss(name: str, step: int, loss: float) -> None:
            loss_rows.append({"model": name, "step": step, "loss": loss})
            tracked.metrics({f"loss.{name}": loss}, step=step)

        metrics = pretrain(params, problems_dir, models_dir, sandbox, on_progress, on_loss)
        if params.pretrain.setting == "default":
            metrics["targets"] = targets(metrics)
        rows = competence_rows(metrics)
        # outputs first: a tracking failure must not lose what was measured
        write_metrics(metrics_path, metrics, HEADLINE)
        with atomic_open(plots_dir / "pretrain_loss.csv") as f:
            f.write("model,step,loss\n" + "".join(
                f"{r['model']},{r['step']},{r['loss']:.4f}\n" for r in loss_rows))
        with atomic_open(plots_dir / "competence.csv") as f:
            f.write("model,split,family,pass_at_1\n" + "".join(
                f"{r['model']},{r['split']},{r['family']},{r['pass@1']:.3f}\n" for r in rows))
        loss_png = save_png(line_figure(loss_rows, "model", ylabel="loss (thoughts + code)",
                                        title="pretraining loss per model"),
                            plots_dir / "pretrain_loss.png")
        tracked.metrics({k: v for k, v in metrics.items() if k != "models"})
        # without the per-family numbers: those 60 are the competence table, not 60 charts
        # of one point each
        tracked.metrics({"models": {name: {k: ({s: v for s, v in value.items()
                                                 if s != "by_family"}
                                                if isinstance(value, dict) else value)
                                            for k, value in m.items()}
                                    for name, m in metrics["models"].items()}})
        tracked.table(rows, "competence.json")
        tracked.artifact(loss_png)
        tracked.artifact(details_path(metrics_path))
    return metrics
