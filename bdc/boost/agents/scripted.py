"""A model-free agent whose replies are Python functions: for testing the search logic exactly,
and for measuring the search's own overhead per node (it answers instantly)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bdc.boost.agents.base import Agent, Feedback, Reply, Thought
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
    calls: list[tuple[str, PublicView, tuple]] = field(default_factory=list)

    @property
    def can_merge(self) -> bool:
        return self.merger is not None

    async def propose(self, view, thoughts, width, seed):
        self.calls.append(("propose", view, (list(thoughts), width)))
        out = self.proposals(view, thoughts, width, seed)
        if out is None:
            return Reply(done=True)
        return Reply(thoughts=[Thought(t, p) for t, p in out[:width]])

    async def write(self, view, thoughts, n, seed):
        self.calls.append(("write", view, (None if thoughts is None else list(thoughts), n)))
        return Reply(programs=list(self.programs(view, thoughts, n, seed))[:n])

    async def refine(self, view, thoughts, feedback: list[Feedback], seed):
        self.calls.append(("refine", view, (list(thoughts), feedback)))
        out = self.rewrite(view, thoughts, feedback, seed) if self.rewrite else None
        return Reply(thoughts=[Thought(*out)] if out else [])

    async def merge(self, view, thoughts, candidates, seed):
        self.calls.append(("merge", view, (list(thoughts), list(candidates))))
        out = self.merger(view, thoughts, candidates, seed) if self.merger else None
        return Reply(thoughts=[Thought(*out)] if out else [])
