"""A model-free agent whose replies are Python functions: for testing the search logic exactly,
and for measuring the search's own overhead per node (it answers instantly)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bdc.boost.agents.base import ROLES, Agent, Feedback, Reply, Thought
from bdc.problems.format import PublicView

Proposals = Callable[[PublicView, list[str], int, int], list[tuple[str, float]] | None]
Programs = Callable[[PublicView, list[str] | None, int, int], list[str]]
Rewrite = Callable[[PublicView, list[str], list, int], tuple[str, float] | None]


@dataclass
class ScriptedAgent(Agent):
    name: str
    proposals: Proposals
    programs: Programs
    rewrite: Rewrite | None = None  # refine; None: no rewrite
    merger: Rewrite | None = None  # merge; None: cannot merge
    cost: int = 0  # tokens each reply is said to cost (for budget tests)
    roles: tuple[str, ...] = ROLES
    calls: list[tuple[str, PublicView, tuple]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # every seed it was given, in order

    @property
    def can_merge(self) -> bool:
        return self.merger is not None

    async def propose(self, view, thoughts, width, seed):
        self.calls.append(("propose", view, (list(thoughts), width)))
        self.seeds.append(seed)
        out = self.proposals(view, thoughts, width, seed)
        if out is None:
            return Reply(done=True, tokens=self.cost)
        return Reply(thoughts=[Thought(t, p) for t, p in out[:width]], tokens=self.cost)

    async def write(self, view, thoughts, n, seed):
        self.calls.append(("write", view, (None if thoughts is None else list(thoughts), n)))
        self.seeds.append(seed)
        return Reply(programs=list(self.programs(view, thoughts, n, seed))[:n],
                     tokens=self.cost)

    async def refine(self, view, thoughts, last, feedback: list[Feedback], seed):
        chain = [*thoughts, *last.splitlines()]
        self.calls.append(("refine", view, (chain, feedback)))
        self.seeds.append(seed)
        out = self.rewrite(view, chain, feedback, seed) if self.rewrite else None
        return Reply(thoughts=[Thought(*out)] if out else [], tokens=self.cost)

    async def merge(self, view, thoughts, candidates, seed):
        self.calls.append(("merge", view, (list(thoughts), list(candidates))))
        self.seeds.append(seed)
        out = self.merger(view, thoughts, candidates, seed) if self.merger else None
        return Reply(thoughts=[Thought(*out)] if out else [], tokens=self.cost)
