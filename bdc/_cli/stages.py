"""``bdc <stage>``: one command per DVC stage (and ``explore-compare``, an experiment); each
reads its settings, calls the stage module, and reports."""

from __future__ import annotations

from pathlib import Path

import typer

from bdc import console
from bdc._cli.app import ParamsOption, UserError, _params, app

# the stages' folders, as dvc.yaml passes them (a stage's own outputs are its --out-dir)
ProblemsDir = typer.Option(Path("data/problems"), "--problems-dir")
PlotsDir = typer.Option(Path("data/plots"), "--plots-dir")
ExploreDir = typer.Option(Path("data/explore"), "--explore-dir")
ValidateDir = typer.Option(Path("data/validate"), "--validate-dir")
ClustersDir = typer.Option(Path("data/clusters"), "--clusters-dir")
ExpertsDir = typer.Option(Path("data/experts"), "--experts-dir")


def _writable(metrics: Path, *folders: Path | None) -> None:
    """Every folder the stage writes takes a file, checked before any work: a stage that
    failed on its last output (a read-only plots folder) had already rewritten the others,
    which then looked fresh."""
    from bdc.jsonl import details_path, require_writable

    require_writable(metrics.parent, details_path(metrics).parent,
                     *[f for f in folders if f is not None])


@app.command("prepare")
def prepare_cmd(
    out_dir: Path = typer.Option(Path("data/problems"), "--out-dir", help="where explore.jsonl "
                                 "and test.jsonl go"),
    metrics: Path = typer.Option(Path("data/metrics/prepare.json"), "--metrics",
                                 help="metrics JSON to write"),
    plots: Path = typer.Option(Path("data/plots/prepare.csv"), "--plots",
                               help="tests-per-problem CSV (a DVC plot)"),
    params: Path | None = ParamsOption,
) -> None:
    """Stage prepare: build the explore and test problem pools from params.problems."""
    from bdc.stages.prepare import run

    _writable(metrics, out_dir, plots.parent)

    result = run(_params(params), out_dir, metrics, plots)
    for pool in ("explore", "test"):
        m = result[pool]
        console.say(f"{pool}: {m['problems']} problems, {m['tests_per_problem']:.1f} tests "
                      f"each, by source {m['by_source']}")


@app.command("pretrain")
def pretrain_cmd(
    problems_dir: Path = typer.Option(Path("data/problems"), "--problems-dir",
                                      help="pretrain, explore and test problems"),
    models_dir: Path = typer.Option(Path("data/models"), "--models-dir",
                                    help="one Hugging Face folder per model goes here"),
    metrics: Path = typer.Option(Path("data/metrics/pretrain.json"), "--metrics"),
    plots_dir: Path = PlotsDir,
    params: Path | None = ParamsOption,
) -> None:
    """Stage pretrain (mini profile): train the tiny agents and base model from scratch and
    measure their competence in the sandbox."""
    from bdc.stages.pretrain import run

    _writable(metrics, models_dir, plots_dir)

    with console.progress() as progress:
        tasks: dict[str, int] = {}

        def tick(name: str, step: int, total: int, loss: float) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(f"training {name}", total=total, info="")
            progress.update(tasks[name], completed=step, info=f"loss {loss:.3f}")

        result = run(_params(params), problems_dir, models_dir, metrics, plots_dir, tick)
    console.table("competence: pass@1 on hidden tests", ["model", "explore", "test", "train s"],
                  [[name, f"{m['explore']['pass@1']:.3f}", f"{m['test']['pass@1']:.3f}",
                    f"{m['train_seconds']:.0f}"] for name, m in result["models"].items()],
                  right=["explore", "test", "train s"])
    if result.get("boosting"):
        console.say(f"equal budget of 2 programs: {result['boosting']}")
    for target, met in (result.get("targets") or {}).items():
        console.say(f"target {target}: {'met' if met else 'NOT met'}")


@app.command("explore")
def explore_cmd(
    problems: Path = typer.Option(Path("data/problems/explore.jsonl"), "--problems",
                                  help="problems to explore (their hidden tests score the "
                                  "answers once; the search never sees them)"),
    out_dir: Path = typer.Option(Path("data/explore"), "--out-dir",
                                 help="trees/, sft.jsonl, prefs.jsonl, example_tree.md"),
    metrics: Path = typer.Option(Path("data/metrics/explore.json"), "--metrics"),
    plots_dir: Path | None = typer.Option(None, "--plots-dir",
                                          help="where explore.png goes (none: no plot)"),
    params: Path | None = ParamsOption,
) -> None:
    """Stage explore (Boost): MC-Tree-of-Agents over the explore problems; resumes from the
    problems already explored with the same settings."""
    from bdc.stages.explore import run

    _writable(metrics, out_dir, plots_dir)

    with console.progress() as progress:
        task = progress.add_task("exploring", total=None, info="")

        def tick(done: int, total: int, solved: int, seconds: float) -> None:
            rate = f", {60 * done / seconds:.1f} problems/min" if seconds > 0 else ""
            progress.update(task, completed=done, total=total,
                            info=f"solved {solved}/{done} (hidden){rate}" if done else "")

        result = run(_params(params), problems, out_dir, metrics, tick, plots_dir)
    console.say(
        f"{result['problems']} problems: hidden solve rate {result['hidden_solve_rate']:.3f}, "
        f"public {result['public_solve_rate']:.3f}; {result['sft_records']} SFT records "
        f"({result['sft_chain_share']:.0%} of SFT problems with a thought chain), "
        f"{result['preference_pairs']} preference pairs; {result['tokens']} tokens, "
        f"{result['wall_seconds']:.0f}s"
        + (f"; {result['failed_problems']} failed (re-run to retry): "
           f"{', '.join(result['failed'][:5])}" if result["failed_problems"] else ""))
    for name, a in result["agents"].items():
        console.say(f"  {name}: answer share {a['answer_share']:.2f}, thought share "
                      f"{a['thought_share']:.2f}, {a['tokens']} tokens")


@app.command("explore-compare")
def explore_compare_cmd(
    problems: Path = typer.Option(Path("data/problems/explore.jsonl"), "--problems"),
    teams: str | None = typer.Option(None, "--teams", help="comma-separated teams of "
                                     "explore_compare.teams (default: all of them)"),
    per_family: int | None = typer.Option(None, "--per-family", min=1, help="mini: the "
                                          "first N problems of each family (default: "
                                          "explore_compare.per_family)"),
    seeds: str | None = typer.Option(None, "--seeds", help="comma-separated (default: "
                                     "explore_compare.seeds)"),
    out: Path = typer.Option(Path("data/metrics/explore_compare.json"), "--out"),
    params: Path | None = ParamsOption,
) -> None:
    """The tree of agents against each agent's tree and best-of-N sampling, at the same
    budget of executed programs, over several seeds, for each team; logged to MLflow."""
    from bdc.stages.explore_compare import run

    try:
        seed_list = None if seeds is None else [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise UserError(f"--seeds: expected integers like 0,1,2, got {seeds!r}") from exc
    team_list = None if teams is None else [t.strip() for t in teams.split(",") if t.strip()]
    table = run(_params(params), problems, out, team_list, per_family, seed_list,
                problems.parent, lambda name, seed, r: console.say(
                    f"{name} seed {seed}: hidden solve rate {r['hidden_solve_rate']:.3f}"))
    print(table)  # the markdown comparison table: a result, on stdout


@app.command("validate")
def validate_cmd(
    explore_dir: Path = typer.Option(Path("data/explore"), "--explore-dir",
                                     help="explore outputs: trees/, sft.jsonl, prefs.jsonl"),
    problems_dir: Path = typer.Option(Path("data/problems"), "--problems-dir",
                                      help="the explore and test pools"),
    out_dir: Path = typer.Option(Path("data/validate"), "--out-dir",
                                 help="Data Docs and, on success, report.json"),
    metrics: Path = typer.Option(Path("data/metrics/validate.json"), "--metrics"),
    params: Path | None = ParamsOption,
) -> None:
    """Stage validate: Great Expectations over the explored data; fails (exit 2, naming the
    failed expectations and problems) when it is not fit to train on."""
    from bdc.stages.validate import run

    _writable(metrics, out_dir)

    result = run(_params(params), explore_dir, problems_dir, out_dir, metrics)
    rows = ", ".join(f"{n} {name}" for name, n in result["rows"].items())
    console.say(f"validated: {result['expectations']} expectations hold over {rows}; "
                f"Data Docs in {out_dir / 'docs'}")


@app.command("disentangle")
def disentangle_cmd(
    explore_dir: Path = typer.Option(Path("data/explore"), "--explore-dir",
                                     help="explore outputs (sft.jsonl)"),
    validate_dir: Path = typer.Option(Path("data/validate"), "--validate-dir",
                                      help="validate's output (report.json vouches for the "
                                      "SFT file)"),
    problems_dir: Path = ProblemsDir,
    out_dir: Path = typer.Option(Path("data/clusters"), "--out-dir"),
    metrics: Path = typer.Option(Path("data/metrics/disentangle.json"), "--metrics"),
    plots_dir: Path = PlotsDir,
    params: Path | None = ParamsOption,
) -> None:
    """Stage disentangle: embed the validated SFT data and cluster it (k fixed or by
    silhouette); assignments, centroids and the embedder for the experts and hypernetwork."""
    from bdc.stages.disentangle import run

    _writable(metrics, out_dir, plots_dir)

    m = run(_params(params), explore_dir, validate_dir, problems_dir, out_dir, metrics,
            plots_dir)
    console.say(f"{m['k']} clusters of {m['records']} records ({m['problems']} problems), "
                f"embedding each {m['embed']}; sizes {m['cluster_records']}")
    for mode in ("problem", "record"):
        keys = [k for k in ("silhouette", "ari", "nmi", "routing_accuracy")
                if f"{mode}.{k}" in m]
        console.say(f"  embed {mode}: k {m[f'{mode}.k']}, " + ", ".join(
            f"{k} {m[f'{mode}.{k}']:.3f}" for k in keys))


@app.command("experts")
def experts_cmd(
    explore_dir: Path = ExploreDir,
    validate_dir: Path = ValidateDir,
    clusters_dir: Path = ClustersDir,
    problems_dir: Path = ProblemsDir,
    out_dir: Path = typer.Option(Path("data/experts"), "--out-dir",
                                 help="one PEFT adapter folder per expert, full and merges"),
    metrics: Path = typer.Option(Path("data/metrics/experts.json"), "--metrics"),
    plots_dir: Path = PlotsDir,
    params: Path | None = ParamsOption,
) -> None:
    """Stage experts: one LoRA per cluster and one on all data (PEFT, one loaded base), the
    static merges and Arrow, a quick competence check, the expert set in the registry."""
    from bdc.stages.experts import run

    _writable(metrics, out_dir, plots_dir)

    def started(name: str, reused: bool) -> None:
        console.say(f"{name}: {'already trained, reused' if reused else 'training'}")

    m = run(_params(params), explore_dir, validate_dir, clusters_dir, problems_dir, out_dir,
            metrics, plots_dir, started)
    console.table("competence: pass@1 on a held-out slice per cluster",
                  ["solver", "mean", "by cluster"],
                  [[name, f"{row['mean']:.3f}", ", ".join(f"{c}: {v:.2f}" for c, v in
                                                          row["by_cluster"].items())]
                   for name, row in m["competence"].items()], right=["mean"])
    console.say(f"registered models:/bdc-experts/{m['registered_version']}")


@app.command("customize")
def customize_cmd(
    explore_dir: Path = ExploreDir,
    validate_dir: Path = ValidateDir,
    clusters_dir: Path = ClustersDir,
    experts_dir: Path = ExpertsDir,
    problems_dir: Path = ProblemsDir,
    out_dir: Path = typer.Option(Path("data/hypernet"), "--out-dir"),
    metrics: Path = typer.Option(Path("data/metrics/customize.json"), "--metrics"),
    plots_dir: Path = PlotsDir,
    params: Path | None = ParamsOption,
) -> None:
    """Stage customize: train the input-aware hypernetwork over the experts (base and
    experts frozen); routing diagnostics; the solver in the registry."""
    from bdc.stages.customize import run

    _writable(metrics, out_dir, plots_dir)

    m = run(_params(params), explore_dir, validate_dir, clusters_dir, experts_dir,
            problems_dir, out_dir, metrics, plots_dir)
    trained = "reused" if m["reused"] else f"trained in {m['train_seconds']}s"
    console.say(f"hypernetwork over {m['experts']} experts (rank {m['rank']}, "
                f"{m['adapted_modules']} modules), {trained}: best val loss "
                f"{m['best_val_loss']}; weight entropy {m['normalised_entropy']:.3f}, "
                f"own-expert weight {m['own_expert_weight']}; fold cache hit rate "
                f"{m['fold_cache_hit_rate']:.2f}; registered "
                f"models:/bdc-solver/{m['registered_version']}")


@app.command("evaluate-solvers")
def evaluate_solvers_cmd(
    problems_dir: Path = ProblemsDir,
    experts_dir: Path = ExpertsDir,
    clusters_dir: Path = ClustersDir,
    hypernet_dir: Path = typer.Option(Path("data/hypernet"), "--hypernet-dir"),
    out_dir: Path = typer.Option(Path("data/eval"), "--out-dir"),
    metrics: Path = typer.Option(Path("data/metrics/evaluate.json"), "--metrics"),
    plots_dir: Path = PlotsDir,
    params: Path | None = ParamsOption,
) -> None:
    """Stage evaluate: every System-1 solver (and the System-2 side) on the test problems'
    hidden tests; the table and the claims as measured."""
    from bdc.stages.evaluate import run

    _writable(metrics, out_dir, plots_dir)

    result = run(_params(params), problems_dir, experts_dir, clusters_dir, hypernet_dir,
                 out_dir, metrics, plots_dir)
    print(result["table"])  # the result, on stdout
