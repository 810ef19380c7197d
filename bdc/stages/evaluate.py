"""Stage ``evaluate``: every System-1 solver the pipeline made on the test problems' hidden
tests (the only stage that reads them), with the System-2 side for reference, in one table;
and the answer to "did Boost, Disentangle and Customize each help?" as measured.

Solvers: the base model; the full-data LoRA; each expert alone; the oracle expert (the
expert of the cluster the problem's family's training records fell in: mini only); the
uniform, linear, TIES and DARE merges; Arrow; the customized solver. System-2 rows: the
tree of agents, each agent's own tree and best-of-N pooled over the agents, at the explore
budget.

Finished work is kept in ``var/evaluate/`` as it finishes (each solver's programs and
scores, each System-2 method's seed), named by everything that made it: a
killed or failed run resumes where it stopped; anything changed starts afresh.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bdc import artifacts
from bdc.config import Params
from bdc.disentangle.routing import require_same_clusters
from bdc.evaluate.claims import headline_metrics, lines, metric_key, verdict
from bdc.evaluate.solvers import evaluate_all, finished_dirs, group_of, home_clusters
from bdc.evaluate.table import figures, markdown
from bdc.jsonl import atomic_open, write_jsonl, write_metrics
from bdc.llm.packaged import ensure
from bdc.problems.format import read_problems
from bdc.problems.mini import first_per_family
from bdc.runtime import state_dir

log = logging.getLogger(__name__)
# the numbers `dvc metrics show` shows (the claims' solvers), under the MLflow runs' keys;
# every solver's go to data/metrics/details/evaluate.json and the table
# (and the System-2 tree of all agents and their pooled best-of-N, whatever their names)
HEADLINE = tuple(f"{metric_key(solver)}.strict_accuracy" for solver in (
    "base", "full", "oracle expert", "merge_uniform", "arrow", "customized"))


def run(params: Params, problems_dir: Path, experts_dir: Path, clusters_dir: Path,
        hypernet_dir: Path, out_dir: Path, metrics_path: Path, plots_dir: Path) -> dict:
    """The stage with its MLflow run; the table."""
    from bdc.sandbox import Sandbox
    from bdc.tracking import stage_run

    s = params.evaluate
    test = read_problems(problems_dir / artifacts.pool("test"))
    test = first_per_family(test, s.per_group, group_of)  # per slice, family or source
    manifest = json.loads((experts_dir / artifacts.MANIFEST).read_text())
    require_same_clusters(manifest, experts_dir, clusters_dir)
    experts = manifest["experts"]
    home = home_clusters(clusters_dir)
    temperature = s.temperature or None
    ensure(params)  # the packaged real models its settings name, converted once
    with stage_run("evaluate", {"evaluate": s.model_dump(), "experts.base": params.experts.base,
                                "problems": len(test)}, params.profile, doc=__doc__) as tracked, \
            Sandbox(params.sandbox) as sandbox:
        tracked.dataset(problems_dir / artifacts.pool("test"), "test problems", "evaluation")
        kept = finished_dirs(params, test, experts_dir, clusters_dir, hypernet_dir, manifest,
                             state_dir() / "evaluate")
        done = evaluate_all(params, test, experts_dir, clusters_dir, hypernet_dir, manifest,
                            sandbox, kept)
        outcomes, result, measured, order = done.outcomes, done.result, done.claims, done.order
        tracked.metrics({"reused_chunks": len(done.reused)})
        sampling = "greedy: the seeds draw the same programs, so std is 0 by construction" \
            if temperature is None else f"sampling at temperature {s.temperature}"
        no_expert = sorted({str(p.meta["family"]) for p in test  # (HumanEval has none)
                            if home and p.meta.get("family") and p.meta["family"] not in home})
        note = (f"{len(test)} test problems; hidden tests; {len(s.seeds)} seeds ({sampling}); "
                "mean ± sample std over the seeds; the 95% CI: percentile bootstrap over "
                "problems; tokens and seconds per seed."
                + (" Generated on vLLM (Arrow on transformers: vLLM has no per-token "
                   "router)." if s.engine == "vllm" else "")
                + (f" Families without training records (the oracle uses the base model): "
                   f"{', '.join(no_expert)}." if no_expert else ""))
        md = markdown(result, order, s.ks, note) + "\nClaims (strict accuracy, paired over " \
            "problems; a claim holds only where its interval excludes zero):\n\n" + lines(measured)
        write_jsonl(out_dir / artifacts.SAMPLES, [o.__dict__ for o in outcomes])
        table = {"solvers": result, "claims": measured, "order": order,
                 "oracle_without_expert": no_expert}
        with atomic_open(out_dir / artifacts.TABLE_JSON) as f:
            json.dump(table, f, indent=2)
        with atomic_open(out_dir / artifacts.TABLE_MD) as f:
            f.write(md)
        headline = {metric_key(name): {
            "pass_rate": round(r["pass_rate"]["mean"], 2),
            "strict_accuracy": round(r["strict_accuracy"]["mean"], 2),
            "strict_accuracy_std": round(r["strict_accuracy"]["std"], 2)}
            for name, r in result.items()}
        trees = tuple(f"{metric_key(n)}.strict_accuracy" for n in result  # agents' names
                      if n.startswith("System-2: ") and "+" in n)
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
        tracked.metrics(headline_metrics(table))  # the pipeline run logs the same keys
        tracked.table([{"solver": n, **headline[metric_key(n)]} for n in order if n in result],
                      artifacts.TABLE_JSON)
        tracked.artifact(out_dir / artifacts.TABLE_MD)
        tracked.artifact(plots_dir / "eval_solvers.png")
        tracked.artifact(plots_dir / "eval_families.png")
        tracked.tag("bdc.summary", artifacts.TABLE_MD)
        tracked.describe(verdict(table) + f"\n\nThe whole table: the artifact "
                         f"{artifacts.TABLE_MD} ({len(result)} solvers; {note})")
        for key, value in {"experts": len(experts), "temperature": s.temperature,
                           "seeds": len(s.seeds), "base": params.experts.base}.items():
            tracked.tag(f"bdc.eval.{key}", str(value))
    return {"table": md, "claims": measured, "problems": len(test)}
