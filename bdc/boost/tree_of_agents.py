"""MC-Tree-of-Agents: Monte-Carlo tree search over thoughts, with several LLM agents.

The whole algorithm is in this file. A decision node holds a state (the problem and the
thoughts so far); its children are candidate next thoughts (a thought is one step of a plan,
or, for agents that propose whole plans, the remaining steps at once). One rollout:

1. **select** a leaf by variable P-UCB (or P-UCB / UCT) over open nodes;
2. **expand** it: *every* agent proposes ``width`` next thoughts with priors; with ``boost``,
   each agent also merges the other agents' candidates into one thought of its own;
3. **simulate** every new child: every agent writes ``trials`` programs from problem +
   thoughts; each runs on the **public** tests in the sandbox; the child's value is the mean
   pass rate, its best program is kept;
4. **refine** the best failing new child: each agent sees its failing public tests (input,
   expected, actual) and rewrites the last thought; the rewrites become siblings;
5. **prune** children worse than their parent (not expanded further), and **back up** every
   new value along the path with discount ``gamma`` (Q = the best return seen).

The search sees a :class:`PublicView` only: hidden tests cannot reach it, by type and by a
runtime check. The answer is the program with the best public pass rate; scoring it on the
hidden tests is the caller's business (``bdc.boost.exploration``), done once.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field

from bdc.boost.agents.base import Agent, Feedback, Reply
from bdc.config import SearchSettings
from bdc.jsonl import json_safe
from bdc.problems.format import CallTest, CodeTest, PublicView, StdioTest
from bdc.sandbox import Execution, ExecutionResult, Sandbox


@dataclass
class ProgramRun:
    agent: str
    code: str
    pass_rate: float
    passed: int
    total: int
    status: str
    feedback: list[dict] = field(default_factory=list)  # failing public tests
    thoughts: list[str] = field(default_factory=list)  # the writer's own, when it had none


@dataclass
class Node:
    id: int
    parent: int | None
    depth: int  # thoughts (expansions) from the root
    thoughts: list[str]  # every step of the chain so far
    steps: int = 0  # how many of them this node's thought added
    kind: str = "root"  # root | propose | merge | refine
    agent: str | None = None  # who proposed the last thought
    prior: float = 1.0  # the proposer's own rating
    p: float = 1.0  # prior normalised over siblings: p(a|s) in P-UCB
    programs: list[ProgramRun] = field(default_factory=list)
    value: float = 0.0  # mean public pass rate of its programs
    q: float = 0.0  # best discounted return seen through this node
    visits: int = 0
    children: list[int] = field(default_factory=list)
    expanded: bool = False
    terminal: bool = False
    pruned: bool = False
    closed: bool = False  # nothing left to expand below
    widened: int = 0  # times its agents were asked for more thoughts (progressive widening)
    saturated: bool = False  # asked again, they had nothing new
    tokens: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # fallbacks and why a node ended

    @property
    def action(self) -> str | None:
        """This node's thought: the steps it added to its parent's chain."""
        return "\n".join(self.thoughts[-self.steps:]) if self.steps else None

    def best(self) -> ProgramRun | None:
        return max(self.programs, key=lambda r: r.pass_rate, default=None)

    def chain(self, run: ProgramRun) -> list[str]:
        """The thought chain ``run``'s program was written from: this node's thoughts, or at
        the root the ones its writer wrote before the code."""
        return self.thoughts or run.thoughts


@dataclass
class Tree:
    problem_id: str
    nodes: list[Node] = field(default_factory=list)
    programs: int = 0
    tokens: int = 0
    agent_tokens: dict[str, int] = field(default_factory=dict)
    rollouts: int = 0
    seconds: float = 0.0
    stopped: str = ""  # which budget or condition ended the search

    def answer(self) -> tuple[Node, ProgramRun] | None:
        """The program with the best public pass rate. Among equals, one written from a
        chain the search built wins, then one with its writer's own chain, then the earliest:
        the answer is also the training data, and a record without thoughts teaches System 1
        nothing about planning."""
        best, best_key = None, None
        for node in self.nodes:
            for run in node.programs:
                key = (run.pass_rate, bool(node.thoughts), bool(node.chain(run)))
                if best_key is None or key > best_key:
                    best, best_key = (node, run), key
        return best

    def to_dict(self) -> dict:
        return asdict(self)


def seed_of(*parts: object) -> int:
    """A stable seed for one agent call: the same call gets the same seed in every run."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def selection_score(settings: SearchSettings, parent_visits: int, child: Node) -> float:
    """``Q + beta(N) p sqrt(ln N) / (1 + n)`` (variable P-UCB), or P-UCB / UCT."""
    n, big_n = child.visits, max(parent_visits, 1)
    if settings.selection == "uct":
        return math.inf if n == 0 else child.q + settings.uct_c * math.sqrt(math.log(big_n) / n)
    beta = settings.c if settings.selection == "pucb" else \
        math.log((big_n + settings.c_base + 1) / settings.c_base) + settings.c
    return child.q + beta * child.p * math.sqrt(math.log(big_n)) / (1 + n)


def feedback_of(view: PublicView, result: ExecutionResult, limit: int) -> list[dict]:
    """The failing public tests as the program saw them: input, expected, actual."""
    out = []
    for test, outcome in zip(view.public_tests, result.outcomes, strict=False):
        if outcome.status == "passed":
            continue
        if isinstance(test, CodeTest):
            shown = {"input": test.code, "expected": "the assertion holds"}
        else:
            assert isinstance(test, CallTest | StdioTest)
            shown = {"input": test.input, "expected": test.output}
        out.append({**shown, "actual": json_safe(outcome.actual), "detail": outcome.detail[:300]})
        if len(out) == limit:
            break
    return out


class Search:
    """One problem's tree. Agents are called concurrently; programs run in the sandbox on
    ``executor`` threads while other trees generate."""

    def __init__(self, view: PublicView, agents: list[Agent], settings: SearchSettings,
                 sandbox: Sandbox, executor: Executor, seed: int) -> None:
        if not isinstance(view, PublicView):
            raise TypeError(f"the search takes a PublicView (no hidden tests), got "
                            f"{type(view).__name__}")
        self.view, self.agents, self.s = view, agents, settings
        self._indexed = list(enumerate(agents))  # an agent's index seeds its calls
        self.sandbox, self.executor, self.seed = sandbox, executor, seed
        self.tree = Tree(problem_id=view.id)
        self._cache: dict[str, ProgramRun] = {}  # identical programs run once
        self._started = 0.0

    # ------------------------------------------------------------------ budgets

    def _budget_left(self) -> str:
        s, t = self.s, self.tree
        if t.programs >= s.max_programs:
            return "max_programs"
        if t.tokens >= s.max_tokens:
            return "max_tokens"
        if time.perf_counter() - self._started >= s.wall_time_s:
            return "wall_time"
        if s.stop_when_solved and any(r.pass_rate == 1.0 for n in t.nodes for r in n.programs):
            return "solved"
        return ""

    def _seed(self, node: Node, agent: int, purpose: str) -> int:
        return seed_of(self.seed, self.view.id, node.id, agent, purpose)

    def _taking(self, role: str) -> list[tuple[int, Agent]]:
        """The agents that take this part of the search (each agent's ``roles``)."""
        return [(i, a) for i, a in self._indexed if role in a.roles]

    def _new_node(self, parent: Node | None, thoughts: list[str], **kw) -> Node:
        node = Node(id=len(self.tree.nodes), parent=None if parent is None else parent.id,
                    depth=0 if parent is None else parent.depth + 1, thoughts=thoughts,
                    steps=len(thoughts) - (0 if parent is None else len(parent.thoughts)), **kw)
        self.tree.nodes.append(node)
        if parent is not None:
            parent.children.append(node.id)
        return node

    def _spend(self, node: Node, reply: Reply, agent: Agent) -> None:
        node.tokens += reply.tokens
        self.tree.tokens += reply.tokens
        self.tree.agent_tokens[agent.name] = self.tree.agent_tokens.get(agent.name, 0) \
            + reply.tokens
        if reply.fallback:
            node.notes.append(f"{agent.name}: {reply.fallback}")

    # ------------------------------------------------------------------ simulate

    async def _execute(self, agent: str, code: str, thoughts: list[str] | None = None
                       ) -> ProgramRun:
        thoughts = list(thoughts or [])
        if code in self._cache:
            return ProgramRun(**{**asdict(self._cache[code]), "agent": agent,
                                 "thoughts": thoughts})
        total = len(self.view.public_tests)
        if not code.strip():
            run = ProgramRun(agent, code, 0.0, 0, total, "error",
                             [{"detail": "no program in the reply"}], thoughts)
        else:
            execution = Execution(program=code, kind=self.view.kind,
                                  entry_point=self.view.entry_point,
                                  tests=list(self.view.public_tests))
            result = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.sandbox.run, execution)
            run = ProgramRun(agent, code, result.pass_rate, result.passed, result.total,
                             result.status, feedback_of(self.view, result,
                                                        self.s.feedback_tests), thoughts)
        self._cache[code] = run
        return run

    async def simulate(self, node: Node) -> None:
        """Every agent that writes writes ``trials`` programs (as far as the budget allows);
        value = mean public pass rate."""
        started = time.perf_counter()
        left = self.s.max_programs - self.tree.programs
        able = self._taking("write")
        if left <= 0 or not able:
            return
        writers = able[:max(0, left // self.s.trials)] or able[:1]
        counts = [min(self.s.trials, left - k * self.s.trials) for k in range(len(writers))]
        self.tree.programs += sum(counts)  # reserved now: other nodes simulate meanwhile
        # At the root there is no thought yet: each agent answers its own way (for the mini
        # models, thoughts and code in one go, as they were trained); the thoughts it writes
        # are kept with its program.
        thoughts = node.thoughts if node.thoughts else None
        purpose = f"write{len(node.programs)}"  # a revisit draws new programs
        replies = await asyncio.gather(*[
            agent.write(self.view, thoughts, n, self._seed(node, i, purpose))
            for (i, agent), n in zip(writers, counts, strict=True)])
        jobs = []
        for (_, agent), reply in zip(writers, replies, strict=True):
            self._spend(node, reply, agent)
            chains = reply.chains or [[] for _ in reply.programs]
            jobs += [self._execute(agent.name, code, chain)
                     for code, chain in zip(reply.programs, chains, strict=True)]
        self.tree.programs -= sum(counts) - len(jobs)  # the budget counts what came back
        node.programs += await asyncio.gather(*jobs)
        node.value = sum(r.pass_rate for r in node.programs) / len(node.programs) \
            if node.programs else 0.0
        node.q, node.visits = max(node.q, node.value), node.visits + 1
        node.seconds += time.perf_counter() - started

    # ------------------------------------------------------------------ select

    def select(self) -> Node | None:
        """Descend by the selection score to an open, unexpanded node."""
        root = self.tree.nodes[0]
        while not root.closed:
            node = root
            while node.expanded:
                live = [self.tree.nodes[c] for c in node.children
                        if not self.tree.nodes[c].closed]
                if not live:
                    node.closed = True
                    break
                node = max(live, key=lambda c: (selection_score(self.s, node.visits, c), -c.id))
            else:
                return node
        return None

    def _reopen(self) -> Node | None:
        """Nothing open is left but budget is: the best pruned node gets its chance after
        all (pruning orders the search; it should not waste the budget)."""
        pruned = [n for n in self.tree.nodes if n.pruned and not n.expanded and n.programs]
        if not pruned:
            return None
        node = max(pruned, key=lambda n: (n.value, n.p, -n.id))
        node.pruned = node.closed = False
        node.notes.append("reopened: tree exhausted with budget left")
        while node.parent is not None:
            node = self.tree.nodes[node.parent]
            node.closed = False
        return self.select()

    def _widen(self) -> Node | None:
        """Nothing is left open: the most promising expanded node gets more thoughts (its
        agents are asked again, with new seeds), rather than re-simulating a complete chain
        whose thoughts may be wrong. ``None`` when every such node is saturated."""
        if not self.s.widen:
            return None
        able = [n for n in self.tree.nodes if n.expanded and not n.terminal and
                not n.saturated and not n.pruned and n.depth < self.s.max_depth]
        if not able:
            return None
        node = max(able, key=lambda n: (n.q, -n.depth, -n.widened, -n.id))
        node.widened += 1
        node.notes.append("widened: nothing left open")
        return node

    def _revisit(self) -> Node | None:
        """Every chain is complete and budget is left: as in MCTS at a terminal state, a
        revisit is another simulation, here of the most promising complete chain."""
        done = [n for n in self.tree.nodes if n.terminal and n.programs and not n.pruned]
        if not done:
            return None
        node = max(done, key=lambda n: (n.q, -n.visits, -n.id))
        node.notes.append("revisited: every chain complete")
        return node

    # ------------------------------------------------------------------ expand

    async def expand(self, leaf: Node) -> list[Node]:
        leaf.expanded = True
        if leaf.depth >= self.s.max_depth:
            leaf.terminal = leaf.closed = True
            leaf.notes.append("max depth")
            return []
        proposers = self._taking("propose")
        purpose = f"propose{leaf.widened}" if leaf.widened else "propose"
        replies = await asyncio.gather(*[
            agent.propose(self.view, leaf.thoughts, self.s.width, self._seed(leaf, i, purpose))
            for i, agent in proposers])
        children: dict[str, Node] = {}
        by_agent: dict[str, list[str]] = {}
        for (_, agent), reply in zip(proposers, replies, strict=True):
            self._spend(leaf, reply, agent)
            for t in reply.thoughts:
                by_agent.setdefault(agent.name, []).append(t.text)
                self._add_child(children, leaf, t.text, t.prior, agent.name, "propose")
        if self.s.boost and len(by_agent) > 1:
            mergers = [(i, a) for i, a in self._taking("merge") if a.can_merge]
            merged = await asyncio.gather(*[
                agent.merge(self.view, leaf.thoughts,
                            [t for name, ts in by_agent.items() if name != agent.name
                             for t in ts], self._seed(leaf, i, "merge"))
                for i, agent in mergers])
            for (_, agent), reply in zip(mergers, merged, strict=True):
                self._spend(leaf, reply, agent)
                for t in reply.thoughts[:1]:
                    self._add_child(children, leaf, t.text, t.prior, agent.name, "merge")
        if not children and leaf.widened:
            leaf.saturated = True
            leaf.notes.append("widening found no new thought")
            return []
        if not children:
            leaf.terminal = leaf.closed = True
            done = all(r.done for r in replies)
            leaf.notes.append("agents: chain complete" if done else "no usable proposals")
            return []
        self._normalise(leaf)
        node = leaf
        while node is not None:  # new open children: the path to them is open again
            node.closed = False
            node = None if node.parent is None else self.tree.nodes[node.parent]
        return list(children.values())

    def _add_child(self, children: dict[str, Node], parent: Node, text: str, prior: float,
                   agent: str, kind: str) -> Node | None:
        """A thought's steps (its lines) extend the parent's chain; identical thoughts are
        one child (the higher prior is kept)."""
        steps = [line.strip() for line in text.splitlines() if line.strip()]
        if not steps:
            return None
        key = " ".join(" ".join(steps).split()).lower()
        known = {" ".join(self.tree.nodes[c].action.split()).lower(): self.tree.nodes[c]
                 for c in parent.children}
        if key in known:
            known[key].prior = max(known[key].prior, prior)
            return None
        children[key] = self._new_node(parent, [*parent.thoughts, *steps], kind=kind,
                                       agent=agent, prior=prior)
        return children[key]

    def _normalise(self, parent: Node) -> None:
        kids = [self.tree.nodes[c] for c in parent.children]
        total = sum(k.prior for k in kids)
        for k in kids:
            k.p = k.prior / total if total > 0 else 1.0 / len(kids)

    # ------------------------------------------------------------------ refine

    async def refine(self, leaf: Node, new: list[Node]) -> list[Node]:
        """Each agent rewrites the last thought of the best failing new child."""
        failing = [c for c in new if c.value < 1.0 and any(r.feedback for r in c.programs)]
        if not failing:
            return []
        target = max(failing, key=lambda c: (c.value, -c.id))
        run = max((r for r in target.programs if r.feedback), key=lambda r: r.pass_rate)
        feedback = [Feedback(input=f.get("input"), expected=f.get("expected"),
                             actual=f.get("actual"), detail=f.get("detail", ""))
                    for f in run.feedback]
        refiners = self._taking("refine")
        replies = await asyncio.gather(*[
            agent.refine(self.view, leaf.thoughts, target.action, feedback,
                         self._seed(target, i, "refine"))
            for i, agent in refiners])
        children: dict[str, Node] = {}
        for (_, agent), reply in zip(refiners, replies, strict=True):
            self._spend(target, reply, agent)
            for t in reply.thoughts[:1]:
                self._add_child(children, leaf, t.text, t.prior, agent.name, "refine")
        if children:
            self._normalise(leaf)
        return list(children.values())

    # ------------------------------------------------------------------ backup

    def backup(self, leaf: Node, new: list[Node]) -> None:
        """Returns flow up with discount; visits count rollouts through each node."""
        chain, node = [], leaf
        while node is not None:
            chain.append(node)
            node = None if node.parent is None else self.tree.nodes[node.parent]
        for child in new:
            for k, ancestor in enumerate(chain, start=1):
                ancestor.q = max(ancestor.q, self.s.gamma ** k * child.value)
        for ancestor in chain:
            ancestor.visits += 1

    # ------------------------------------------------------------------ the loop

    async def run(self, on_rollout: Callable[[Tree], None] | None = None) -> Tree:
        self._started = time.perf_counter()
        root = self._new_node(None, [])
        if self.s.simulate_root:
            await self.simulate(root)
        while self.tree.rollouts < self.s.rollouts:
            stop = self._budget_left()
            if stop:
                self.tree.stopped = stop
                break
            leaf = self.select() or self._reopen() or self._widen()
            if leaf is None:
                revisit = self._revisit()
                if revisit is None:
                    self.tree.stopped = "exhausted"
                    break
                self.tree.rollouts += 1
                await self.simulate(revisit)
                if revisit.parent is not None:
                    self.backup(self.tree.nodes[revisit.parent], [revisit])
                continue
            self.tree.rollouts += 1
            created = await self.expand(leaf)
            await asyncio.gather(*[self.simulate(c) for c in created])
            if self.s.refine and not self._budget_left():
                refined = await self.refine(leaf, [c for c in created if c.programs])
                await asyncio.gather(*[self.simulate(c) for c in refined])
                created += refined
            new = [c for c in created if c.programs]
            for child in created:
                if not child.programs:  # the budget ran out before it could run
                    child.closed = True
                    child.notes.append("not simulated: budget")
                elif self.s.prune and child.value < leaf.value:
                    child.pruned = child.closed = True
            self.backup(leaf, new)
            if on_rollout:
                on_rollout(self.tree)
        else:
            self.tree.stopped = self._budget_left() or "rollouts"
        self.tree.seconds = time.perf_counter() - self._started
        return self.tree

    async def sample(self, n: int) -> Tree:
        """No search: up to ``n`` programs written straight from the problem, one per agent
        per round (round-robin), on one root node: the best-of-N baseline, recorded like a
        tree. With ``stop_when_solved`` it stops after the round that passed the public
        tests, as the tree does; everything generated was executed and is counted."""
        self._started = time.perf_counter()
        root = self._new_node(None, [])
        root.visits = 1
        while self.tree.programs < n:
            if self.tree.tokens >= self.s.max_tokens:
                self.tree.stopped = "max_tokens"
                break
            if time.perf_counter() - self._started >= self.s.wall_time_s:
                self.tree.stopped = "wall_time"
                break
            writers = self._indexed[:n - self.tree.programs]  # every agent: no roles here
            purpose = f"best_of_n{self.tree.rollouts}"
            self.tree.rollouts += 1
            replies = await asyncio.gather(*[
                agent.write(self.view, None, 1, self._seed(root, i, purpose))
                for i, agent in writers])
            jobs = []
            for (_, agent), reply in zip(writers, replies, strict=True):
                self._spend(root, reply, agent)
                chains = reply.chains or [[] for _ in reply.programs]
                jobs += [self._execute(agent.name, code, chain)
                         for code, chain in zip(reply.programs, chains, strict=True)]
            self.tree.programs += len(jobs)
            root.programs += await asyncio.gather(*jobs)
            if self.s.stop_when_solved and any(r.pass_rate == 1.0 for r in root.programs):
                self.tree.stopped = "solved"
                break
            if not jobs:
                self.tree.stopped = "no programs"
                break
        else:
            self.tree.stopped = "max_programs"
        root.value = root.q = sum(r.pass_rate for r in root.programs) / max(
            len(root.programs), 1)
        self.tree.seconds = time.perf_counter() - self._started
        return self.tree


async def best_of_n(view: PublicView, agents: list[Agent], n: int, sandbox: Sandbox,
                    executor: Executor, seed: int, stop_when_solved: bool = True,
                    feedback_tests: int = 3) -> Tree:
    """The baseline at an equal program budget: ``n`` one-shot programs shared round-robin
    by ``agents``, the best public pass rate wins (a one-node tree, for uniform records)."""
    settings = SearchSettings(rollouts=0, max_programs=n, trials=1,
                              stop_when_solved=stop_when_solved, feedback_tests=feedback_tests)
    return await Search(view, agents, settings, sandbox, executor, seed).sample(n)
