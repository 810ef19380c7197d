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

from bdc.llm.base import Usage
from bdc.problems.format import PublicView


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
