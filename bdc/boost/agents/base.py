"""What an agent does in the search, independent of where its LLM runs.

An agent proposes next thoughts with priors, writes programs from a problem and a thought
chain, rewrites a failing thought from execution feedback, and merges other agents'
candidate thoughts. Every call returns what it produced *and* what it cost (tokens), and a
call that could not be parsed says so in ``fallback`` instead of failing or returning
nothing silently.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from bdc.errors import BDCError
from bdc.problems.format import PublicView


class AgentError(BDCError, RuntimeError):
    """A backend failed for good (after its retries); the message says which and why."""


@dataclass(frozen=True)
class Request:
    """One generation request. ``seed`` makes sampling independent of batching: the same
    request gives the same text whichever other requests share its batch."""

    prompt: str | tuple[tuple[str, str], ...]  # raw text, or chat (role, content) messages
    n: int = 1
    temperature: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0
    logprobs: bool = False
    model: str | None = None  # HTTP: this served model or adapter (vLLM LoRA), not the agent's

    @property
    def chat(self) -> bool:
        return not isinstance(self.prompt, str)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.prompt]


@dataclass
class Generation:
    text: str
    tokens: int  # completion tokens of this generation
    logprob: float | None = None  # sum of the generated tokens' log-probabilities
    token_logprobs: list[float] | None = None


@dataclass
class Completion:
    """The ``n`` generations of one request and what they cost.

    One rule on every backend, so that a token budget means the same everywhere: a request
    costs its prompt once plus every token generated, however the backend had to send it
    (a provider that takes ``n = 1`` only gets ``n`` requests; their prompt is counted once
    here, and every one of them in ``Usage``, which is what the provider bills)."""

    generations: list[Generation]
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Usage:
    """Accounting of one backend as its provider sees it: requests sent, the tokens they
    report, money, retries."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    retries: int = 0

    def add(self, other: Usage) -> None:
        for name in ("calls", "prompt_tokens", "completion_tokens", "cost", "retries"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Backend(abc.ABC):
    """Where an LLM runs. ``generate`` is a coroutine so that many trees can wait on it at
    once: local backends batch the waiting requests, HTTP backends issue them concurrently."""

    def __init__(self) -> None:
        self.usage = Usage()

    @abc.abstractmethod
    async def generate(self, request: Request) -> Completion:
        """``request.n`` generations (fewer only if a provider returned fewer)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections or engines."""


@dataclass
class Thought:
    text: str  # one step, or several (one per line) when an agent proposes a whole plan
    prior: float  # the agent's own rating in [0, 1]


@dataclass
class Reply:
    """What one agent call produced, what it cost, and whether parsing needed a fallback."""

    thoughts: list[Thought] = field(default_factory=list)
    programs: list[str] = field(default_factory=list)
    # per program: the thoughts its writer wrote before the code, when it was asked to
    # answer its own way (no chain given); they are the program's chain
    chains: list[list[str]] = field(default_factory=list)
    done: bool = False  # the agent says the thought chain is complete
    tokens: int = 0
    fallback: str = ""  # why the output was not used as intended ("" when it was)


@dataclass
class Feedback:
    """A failing public test, as the program saw it."""

    input: object
    expected: object
    actual: object
    detail: str = ""


ROLES = ("propose", "write", "refine", "merge")


class Agent(abc.ABC):
    """One LLM's part in the MC-Tree-of-Agents. ``roles``: the parts of the search it takes
    (the paper's agents take all; a planner paired with a coder may only propose and refine,
    the coder only write). Best-of-N sampling asks every agent for programs regardless."""

    name: str
    roles: tuple[str, ...] = ROLES

    @abc.abstractmethod
    async def propose(self, view: PublicView, thoughts: list[str], width: int,
                      seed: int) -> Reply:
        """Up to ``width`` next thoughts with priors (``done`` if the chain is complete)."""

    @abc.abstractmethod
    async def write(self, view: PublicView, thoughts: list[str] | None, n: int,
                    seed: int) -> Reply:
        """``n`` programs from the problem and thoughts (``None``: without a thought chain,
        the agent's own one-shot answer, used by the best-of-N baseline)."""

    @abc.abstractmethod
    async def refine(self, view: PublicView, thoughts: list[str], last: str,
                     feedback: list[Feedback], seed: int) -> Reply:
        """A rewrite of the thought ``last`` (which followed ``thoughts``) that addresses the
        failing tests of a program written from it."""

    @abc.abstractmethod
    async def merge(self, view: PublicView, thoughts: list[str], candidates: list[str],
                    seed: int) -> Reply:
        """One thought combining other agents' candidates into a better next step."""

    @property
    def usage(self) -> Usage:
        return Usage()

    @property
    def can_merge(self) -> bool:
        return True
