"""Stage ``explore`` (Boost): MC-Tree-of-Agents over every ``explore`` problem, resumably
(``bdc.boost.exploration.explore``); its metrics, a table per problem and a plot of the
hidden solve rate per family to MLflow.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from bdc.boost.exploration import DERIVED, explore
from bdc.boost.records import SANDBOX_NEUTRAL, per_family
from bdc.config import Params
from bdc.jsonl import details_path, write_metrics
from bdc.llm.packaged import ensure
from bdc.problems.format import read_problems
from bdc.sandbox import Sandbox

# the numbers `dvc metrics show` shows; all of them go to data/metrics/details/
HEADLINE = ("hidden_solve_rate", "sft_records", "wall_seconds")


def run(params: Params, problems_path: Path, out_dir: Path, metrics_path: Path,
        on_progress=None, plots_dir: Path | None = None) -> dict:
    """The stage with its MLflow run: metrics, per-problem table, an example tree, and a plot
    of the hidden solve rate per family (``plots_dir/explore.png``)."""
    from bdc.plots import bar_figure, save_png
    from bdc.tracking import stage_run

    problems = read_problems(problems_path)
    ensure(params)  # the packaged real models its settings name, converted once
    with stage_run("explore", {"explore": params.explore.model_dump(), "seed": params.seed,
                               "sandbox": params.sandbox.model_dump(exclude=SANDBOX_NEUTRAL)},
                   params.profile, doc=__doc__) as tracked, \
            (nullcontext() if params.explore.cluster.address else Sandbox(params.sandbox)) \
            as sandbox:
        tracked.dataset(problems_path, "explore problems", "search")
        metrics, records = explore(params, problems, out_dir, sandbox, on_progress=on_progress)
        metrics["hidden_solve_rate_by_family"] = per_family(problems, records)
        write_metrics(metrics_path, metrics, HEADLINE)
        # the notes' keys are free text (what agents got wrong): the metrics file has them
        tracked.metrics({k: v for k, v in metrics.items() if k != "notes"})
        if plots_dir is not None:
            rates = {"all": metrics["hidden_solve_rate"],
                     **metrics["hidden_solve_rate_by_family"]}
            tracked.artifact(save_png(bar_figure(
                rates, "hidden solve rate", f"explore: {metrics['problems']} problems, "
                f"{metrics['sft_records']} SFT records"), plots_dir / "explore.png"))
        rows = []
        for rec in records:
            ans = rec["answer"] or {}
            rows.append({"problem_id": rec["problem_id"], "nodes": len(rec["tree"]["nodes"]),
                         "programs": rec["tree"]["programs"], "tokens": rec["tree"]["tokens"],
                         "answer_agent": ans.get("agent"),
                         "chain_length": len(ans.get("thoughts") or []),
                         "public_pass_rate": ans.get("public_pass_rate"),
                         "solved_hidden": rec["solved_hidden"],
                         "stopped": rec["tree"]["stopped"]})
        tracked.table(rows, "problems.json")
        for name in DERIVED:
            tracked.artifact(out_dir / name)
        tracked.artifact(details_path(metrics_path))
    return metrics
