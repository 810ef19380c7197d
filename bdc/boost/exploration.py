"""Many problems searched at once by the same agents: the Boost stage's engine.

The agents' LLM calls from all open trees are batched (local backends) or in flight together
(HTTP), and sandbox runs overlap with generation. One problem's failure (an agent error after
its retries, a bug) is handed to ``fail`` with its exception and never stops the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from bdc.boost.agents.base import Agent, Backend
from bdc.boost.tree_of_agents import Search, Tree
from bdc.config import AgentSettings, ExploreSettings
from bdc.problems.format import Problem, PublicView
from bdc.runtime import cpu_cores
from bdc.sandbox import Execution, ExecutionResult, Sandbox

log = logging.getLogger(__name__)
T = TypeVar("T")


# ----------------------------------------------------------------------------- agents

def make_backend(spec: AgentSettings) -> Backend:
    from bdc.boost.agents import backends

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


def make_agents(agents: dict[str, AgentSettings], cpu_threads: int | None = None
                ) -> list[Agent]:
    """One agent per configured name, in order; agents on the same model share its backend."""
    from bdc.boost.agents.llm import STYLES, LLMAgent, Sampling

    shared: dict[tuple, Backend] = {}
    made = []
    for name, spec in agents.items():
        key = (spec.backend, spec.model, spec.base_url, spec.device)
        if key not in shared:
            shared[key] = make_backend(spec)
        made.append(LLMAgent(name, shared[key], STYLES[spec.style](spec.thought),
                             Sampling(spec.temperature, spec.thought_tokens,
                                      spec.program_tokens), tuple(spec.roles)))
    on_cpu = sum(k[0] == "hf" and k[3] == "cpu" for k in shared)
    if on_cpu:
        share_cpu(on_cpu, cpu_threads)
    return made


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
                     method: Method | None = None) -> None:
    """Search ``problems`` with at most ``settings.concurrency`` trees open at once
    (``method``: another search over the same agents, e.g. a baseline). Each problem ends in
    ``finish`` (its tree and hidden score) or ``fail`` (what went wrong)."""
    gate = asyncio.Semaphore(settings.concurrency)
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
