"""Many problems searched at once by the same agents: the Boost stage's engine.

The agents' LLM calls from all open trees are batched (local backends) or in flight together
(HTTP), and sandbox runs overlap with generation. One problem's failure (an agent error after
its retries, a bug) is handed to ``fail`` with its exception and never stops the others.

``explore`` runs a whole selection resumably: each finished problem is written atomically to
its own file, keyed by its fingerprint (``records``); a killed run resumes with the problems
still missing and ends with the outputs of a run never interrupted; a changed setting
searches again. Trees of problems outside the selection are kept (with API agents they are
paid for). A problem whose search failed is recorded with its error and searched again by the
next run; the run fails, naming them, only past ``explore.max_failed_share``. With
``explore.cluster.address`` the problems go out in shards to a Dask cluster
(``dask_shards``), each worker with its own sandbox and agents.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from bdc import artifacts
from bdc.boost.agents.base import Agent
from bdc.boost.records import (
    failure_of,
    fingerprint,
    metrics_of,
    record_of,
    render_tree,
    tree_code_version,
    tree_file,
)
from bdc.boost.training_data import preference_pairs, sft_records
from bdc.boost.tree_of_agents import Search, Tree
from bdc.config import AgentSettings, ExploreSettings, Params, VLLMSettings
from bdc.errors import BDCError
from bdc.jsonl import atomic_open, write_jsonl
from bdc.llm.base import Backend
from bdc.problems.format import Problem, PublicView
from bdc.runtime import cpu_cores, project_root
from bdc.sandbox import Execution, ExecutionResult, Sandbox

log = logging.getLogger(__name__)
T = TypeVar("T")
DERIVED = (artifacts.SFT, artifacts.PREFS, artifacts.EXAMPLE_TREE)  # re-derived every run


class ExploreFailed(BDCError):
    """Too many problems could not be searched; the message names them."""


class PromptTooLong(BDCError):
    """A problem's text is over ``explore.max_prompt_chars``: not searched."""


# ----------------------------------------------------------------------------- agents

def make_backend(spec: AgentSettings, vllm: VLLMSettings | None = None,
                 beside_others: bool = False, wait: bool = True) -> Backend:
    """``spec``'s backend; ``served`` launches its vLLM server now (``vllm``'s settings;
    ``beside_others``: other servers share the cores; ``wait``: until it answers, else the
    caller waits with ``wait_for_servers``)."""
    from bdc.llm import backends

    if spec.backend == "served":
        from bdc.llm.vllm_server import ServedBackend

        return ServedBackend(spec.model, vllm or VLLMSettings(), project_root(),
                             beside_others, wait)
    if spec.backend == "hf":
        return backends.HFBackend(spec.model, spec.batch_size, spec.device, spec.dtype)
    if spec.backend == "vllm":
        return backends.VLLMBackend(spec.model, spec.batch_size, spec.dtype)
    return backends.OpenAIBackend(backends.HTTPSettings(
        base_url=spec.base_url, model=spec.model, api_key_env=spec.api_key_env,
        max_concurrency=spec.max_concurrency, retries=spec.retries, timeout_s=spec.timeout_s,
        price_input_per_mtok=spec.price_input_per_mtok,
        price_output_per_mtok=spec.price_output_per_mtok,
        max_n_per_request=spec.max_n_per_request, supports_seed=spec.supports_seed))


def make_agents(agents: dict[str, AgentSettings], cpu_threads: int | None = None,
                vllm: VLLMSettings | None = None) -> list[Agent]:
    """One agent per configured name, in order; agents on the same model share its backend
    (one server per model for ``served`` agents, launched together)."""
    from bdc.boost.agents.llm import STYLES, LLMAgent, Sampling

    shared: dict[tuple, Backend] = {}
    made = []
    served = {s.model for s in agents.values() if s.backend == "served"}
    for name, spec in agents.items():
        key = (spec.backend, spec.model, spec.base_url, spec.device)
        if key not in shared:
            shared[key] = make_backend(spec, vllm, len(served) > 1, wait=False)
        made.append(LLMAgent(name, shared[key], STYLES[spec.style](spec.thought),
                             Sampling(spec.temperature, spec.thought_tokens,
                                      spec.program_tokens), tuple(spec.roles)))
    wait_for_servers(list(shared.values()))
    on_cpu = sum(k[0] == "hf" and k[3] == "cpu" for k in shared)
    if on_cpu:
        share_cpu(on_cpu, cpu_threads)
    return made


def wait_for_servers(backends: list[Backend]) -> None:
    """Wait for the served backends' servers, launched together (they load at once); if one
    fails to start, stop them all before raising."""
    from bdc.llm.vllm_server import ServedBackend

    served = [b for b in backends if isinstance(b, ServedBackend)]
    try:
        for backend in served:
            backend.wait_ready()
    except BaseException:
        for backend in served:
            backend.server.stop()
        raise


def share_cpu(models: int, threads: int | None) -> None:
    """Local CPU models generate at once (one batch each) next to the sandbox; torch's
    default of one thread per core for each of them oversubscribes the cores, and its
    threads then wait on each other at every step. Measured on 2 cores, two mini agents:
    one thread each searched 7% faster than two each. Process-wide, as torch's setting is."""
    import torch

    torch.set_num_threads(threads or max(1, cpu_cores() // models))


async def closing(agents: list[Agent], work: Awaitable[T]) -> T:
    """Run ``work``, then release the agents' backends (connections, engines)."""
    try:
        return await work
    finally:
        for backend in {id(a.backend): a.backend for a in agents
                        if hasattr(a, "backend")}.values():
            await backend.aclose()


# ----------------------------------------------------------------------------- many problems

async def score_hidden(problem: Problem, tree: Tree, sandbox: Sandbox,
                       executor: ThreadPoolExecutor) -> ExecutionResult | None:
    """The answer on the hidden tests: the one time they are used."""
    best = tree.answer()
    if best is None or not best[1].code.strip():
        return None
    execution = Execution(program=best[1].code, kind=problem.kind,
                          entry_point=problem.entry_point, tests=problem.tests.hidden)
    return await asyncio.get_running_loop().run_in_executor(executor, sandbox.run, execution)


Method = Callable[[PublicView, ThreadPoolExecutor], Awaitable[Tree]]
Finish = Callable[[Problem, Tree, ExecutionResult | None], None]
Fail = Callable[[Problem, BaseException], None]


async def search_all(problems: list[Problem], agents: list[Agent], settings: ExploreSettings,
                     sandbox: Sandbox, seed: int, finish: Finish, fail: Fail,
                     method: Method | None = None,
                     gate: asyncio.Semaphore | None = None) -> None:
    """Search ``problems`` with at most ``settings.concurrency`` trees open at once
    (``method``: another search over the same agents, e.g. a baseline; ``gate``: a limit
    shared with other searches running at the same time). Each problem ends in ``finish``
    (its tree and hidden score) or ``fail`` (what went wrong)."""
    gate = gate or asyncio.Semaphore(settings.concurrency)
    with ThreadPoolExecutor(max(2, sandbox.settings.workers * 2)) as executor:

        def tree_search(view: PublicView, pool: ThreadPoolExecutor) -> Awaitable[Tree]:
            return Search(view, agents, settings.search, sandbox, pool, seed).run()

        async def one(problem: Problem) -> None:
            async with gate:
                try:
                    tree = await (method or tree_search)(problem.public_view(), executor)
                    hidden = await score_hidden(problem, tree, sandbox, executor)
                except Exception as exc:  # noqa: BLE001 - recorded per problem, never lost
                    log.warning("%s: search failed: %s: %s", problem.id, type(exc).__name__,
                                exc)
                    fail(problem, exc)
                    return
                finish(problem, tree, hidden)

        await asyncio.gather(*(one(p) for p in problems))


# ----------------------------------------------------------------------------- searching

async def search_records(problems: list[Problem], agents: list[Agent], params: Params,
                         sandbox: Sandbox, prints: dict[str, str],
                         keep: Callable[[Problem, dict], None]) -> None:
    """Search ``problems``; each ends as a record (its tree and hidden score, or its error)
    handed to ``keep``."""
    await search_all(
        problems, agents, params.explore, sandbox, params.seed,
        lambda p, tree, hidden: keep(p, record_of(p, tree, hidden, prints[p.id])),
        lambda p, exc: keep(p, failure_of(p, exc, prints[p.id])))


def search_shard(problems: list[Problem], params: Params, prints: dict[str, str]
                 ) -> list[dict]:
    """A cluster task: ``problems`` searched together on a worker, with its own sandbox and
    agents; their records in problem order (the driver writes them). Trees are the same as
    in one process: every sampled token depends on its own request's seed only."""
    settings = params.explore
    got: dict[str, dict] = {}

    def collect(problem: Problem, record: dict) -> None:
        got[problem.id] = record

    with Sandbox(params.sandbox) as sandbox:
        agents = make_agents(settings.agents, settings.cpu_threads, params.vllm)
        asyncio.run(closing(agents, search_records(problems, agents, params, sandbox, prints,
                                                   collect)))
    return [got[p.id] for p in problems]


def search_on_cluster(params: Params, problems: list[Problem], prints: dict[str, str],
                      keep: Callable[[Problem, dict], None]) -> None:
    """``problems`` in shards of ``explore.cluster.shard_size`` on the Dask cluster; each
    record handed to ``keep`` here as its shard finishes. A shard whose task failed records
    its problems as failed (searched again by the next run); the others' work is kept."""
    from bdc.boost.dask_shards import dask_client, map_shards, shards

    def shard_done(part: list[Problem], got: list[dict]) -> None:
        for problem, record in zip(part, got, strict=True):
            if record.get("problem_id") != problem.id:
                raise RuntimeError(f"cluster: a shard answered {record.get('problem_id')!r} "
                                   f"for {problem.id!r}")
            keep(problem, record)

    def shard_failed(part: list[Problem], exc: BaseException) -> None:
        for problem in part:
            keep(problem, failure_of(problem, exc, prints[problem.id]))

    cluster = params.explore.cluster
    with dask_client(cluster) as client:
        map_shards(client, search_shard, shards(problems, cluster.shard_size), params, prints,
                   done=shard_done, failed=shard_failed)


# ----------------------------------------------------------------------------- resumable runs

def explore(params: Params, problems: list[Problem], out_dir: Path, sandbox: Sandbox | None,
            agents: list[Agent] | None = None,
            on_progress: Callable[[int, int, int, float], None] | None = None,
            ) -> tuple[dict, list[dict]]:
    """Search every selected problem not already explored with these settings; writes the
    outputs, returns the metrics and the per-problem records (in problem order). With
    ``explore.cluster.address`` the problems are searched in shards on a Dask cluster (each
    worker with its own sandbox; ``sandbox`` unused), the trees written here as they come."""
    settings = params.explore
    if settings.limit:
        problems = problems[:settings.limit]
    started = time.perf_counter()
    (out_dir / artifacts.TREES).mkdir(parents=True, exist_ok=True)
    for name in DERIVED:  # re-derived below; never left stale beside new trees
        (out_dir / name).unlink(missing_ok=True)
    code = tree_code_version()
    prints = {p.id: fingerprint(p, settings, params.sandbox, params.seed, code)
              for p in problems}
    records: dict[str, dict] = {}
    for p in problems:
        try:
            old = json.loads(tree_file(out_dir, p.id).read_text())
        except (OSError, ValueError):
            continue
        # a tree cut short by its wall clock is not a result (a busy machine, or another
        # problem's huge prompt, stopped it): kept for this run's outputs until searched again
        if old.get("fingerprint") == prints[p.id] and "error" not in old and \
                old["tree"]["stopped"] != "wall_time":
            records[p.id] = old
    resumed = len(records)
    todo = [p for p in problems if p.id not in records]
    log.info("explore: %d problems, %d already explored, %d to search", len(problems),
             resumed, len(todo))
    solved = sum(r["solved_hidden"] for r in records.values())
    failed: dict[str, dict] = {}

    def keep(problem: Problem, record: dict) -> None:
        """One problem's record (its tree, or its error), written as soon as it exists."""
        nonlocal solved
        if "error" in record:
            failed[problem.id] = record
        else:
            records[problem.id] = record
            solved += record["solved_hidden"]
        with atomic_open(tree_file(out_dir, problem.id)) as f:
            json.dump(record, f, allow_nan=False)
        if on_progress:
            on_progress(len(records) + len(failed), len(problems), solved,
                        time.perf_counter() - started)

    if on_progress:
        on_progress(len(records), len(problems), solved, 0.0)
    for p in [p for p in todo if len(p.prompt) > settings.max_prompt_chars]:
        keep(p, failure_of(p, PromptTooLong(
            f"{p.id}: its prompt of {len(p.prompt)} characters is over "
            f"explore.max_prompt_chars ({settings.max_prompt_chars}): not searched"),
            prints[p.id]))
    todo = [p for p in todo if p.id not in failed]
    if todo and settings.cluster.address:
        search_on_cluster(params, todo, prints, keep)
    elif todo:
        agents = agents if agents is not None else make_agents(
            settings.agents, settings.cpu_threads, params.vllm)
        asyncio.run(closing(agents, search_records(todo, agents, params, sandbox, prints,
                                                   keep)))
    if len(failed) > settings.max_failed_share * len(problems):
        raise ExploreFailed(
            f"explore: {len(failed)} of {len(problems)} problems could not be searched "
            f"(more than explore.max_failed_share = {settings.max_failed_share}); their "
            f"errors are in {out_dir / artifacts.TREES} and a re-run searches them again: "
            + "; ".join(f"{pid}: {f['error']['type']}: {f['error']['message'][:200]}"
                        for pid, f in list(failed.items())[:10])
            + (" ..." if len(failed) > 10 else ""))
    ordered = [(p, records[p.id]) for p in problems if p.id in records]
    views = {p.id: p.public_view() for p, _ in ordered}
    sft = [r for p, rec in ordered for r in sft_records(views[p.id], rec)]
    prefs = [r for p, rec in ordered for r in preference_pairs(views[p.id], rec)]
    write_jsonl(out_dir / artifacts.SFT, sft)
    write_jsonl(out_dir / artifacts.PREFS, prefs)
    example = max((rec for _, rec in ordered), default=None,
                  key=lambda r: (r["solved_hidden"], len(r["tree"]["nodes"]) <= 40,
                                 len(r["tree"]["nodes"])))
    with atomic_open(out_dir / artifacts.EXAMPLE_TREE) as f:
        f.write(render_tree(example) if example else "no problems\n")
    metrics = metrics_of([rec for _, rec in ordered], time.perf_counter() - started, resumed)
    t2s = [r for r in sft if r["task"] == "t2s"]
    metrics.update({
        "sft_records": len(sft), "preference_pairs": len(prefs),
        "sft_p2t_records": len(sft) - len(t2s),
        "sft_chain_share": sum(bool(r["thoughts"]) for r in t2s) / len(t2s) if t2s else 0.0,
        "failed_problems": len(failed), "failed": sorted(failed),
        "cut_short": sum(rec["tree"]["stopped"] == "wall_time" for _, rec in ordered)})
    return metrics, [rec for _, rec in ordered]
