"""What every LLM backend speaks, wherever the model runs (in this process, a vLLM engine, an
OpenAI-protocol server): a request, its generations, what they cost.

The search's agents, the System-1 solvers and ``bdc serve`` all build on these types; nothing
here knows about thoughts or trees.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from bdc.errors import BDCError


class BackendError(BDCError, RuntimeError):
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
