"""An agent made of a backend (where the LLM runs) and a prompt style (how it is asked).

Two styles. ``mini``: the tiny models' own text format (``### Problem / ### Thoughts /
### Code``); a next thought is the next numbered line, its prior the model's per-token
geometric-mean probability of that line. ``chat``: instructions for instruction-tuned models,
thoughts with self-rated priors as JSON, reflection on failing tests, merging of other
agents' thoughts.

Weak models write broken JSON: parsing is lenient, a failed parse is retried once with another
seed, and what is still unusable comes back as a recorded ``fallback``, never as an exception.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from bdc.boost.agents.base import ROLES, Agent, Feedback, Reply, Thought
from bdc.llm.base import Backend, Generation, Request, Usage
from bdc.llm.prompts import (
    CODE_HEADER,
    body_written,
    function_body,
    parse_steps,
    parseable_prefix,
    program_in,
    render,
    render_state,
)
from bdc.problems.format import CallTest, PublicView, StdioTest


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    thought_tokens: int = 1024
    program_tokens: int = 1024


# ----------------------------------------------------------------------------- parsing

_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.S)
_PRIOR_KEYS = ("prior", "probability", "confidence", "score", "p")
_TEXT_KEYS = ("thought", "text", "step", "content", "idea")


def parse_json(text: str) -> object | None:
    """The first JSON-like value in ``text``: fenced or bare, JSON or a Python literal."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for chunk in candidates:
        pairs = sorted((("{", "}"), ("[", "]")),
                       key=lambda oc: chunk.find(oc[0]) % (len(chunk) + 1))
        for opener, closer in pairs:  # whichever value starts first
            start, end = chunk.find(opener), chunk.rfind(closer)
            if start < 0 or end <= start:
                continue
            body = chunk[start:end + 1]
            try:
                return json.loads(body)
            except ValueError:
                pass
            try:
                return ast.literal_eval(re.sub(r"\btrue\b", "True", re.sub(
                    r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", body))))
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                pass
    return None


def _prior(value: object, default: float) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        return default
    if p > 1:  # a percentage
        p /= 100
    return min(1.0, max(0.0, p)) if math.isfinite(p) else default


def _thought(item: object, default: float) -> Thought | None:
    if isinstance(item, str):
        return Thought(item.strip(), default) if item.strip() else None
    if isinstance(item, dict):
        text = next((item[k] for k in _TEXT_KEYS if isinstance(item.get(k), str)), "")
        prior = next((item[k] for k in _PRIOR_KEYS if k in item), default)
        return Thought(text.strip(), _prior(prior, default)) if text.strip() else None
    return None


def parse_thoughts(text: str, limit: int) -> Reply:
    """``{"thoughts": [{"thought", "prior"}...], "done"}`` or any reasonable variant."""
    value = parse_json(text)
    default = 1.0 / max(limit, 1)
    if isinstance(value, dict):
        done = bool(value.get("done", False))
        items = next((value[k] for k in ("thoughts", "steps", "candidates", "next")
                      if isinstance(value.get(k), list)), None)
        if items is None:  # a single thought object
            single = _thought(value, default)
            items = [] if single is None else [value]
    elif isinstance(value, list):
        done, items = False, value
    else:
        return Reply(fallback="no JSON in the reply")
    thoughts = [t for t in (_thought(i, default) for i in items) if t is not None][:limit]
    if not thoughts and not done:
        return Reply(fallback="JSON without thoughts")
    return Reply(thoughts=thoughts, done=done and not thoughts)




# ----------------------------------------------------------------------------- styles

class _Resampling:
    """Refinement and merging for models that read neither feedback nor other agents'
    thoughts (``reads_feedback`` and ``can_merge`` False): refining resamples the thought."""

    can_merge = False
    reads_feedback = False

    def refine(self, view: PublicView, thoughts: list[str], last: str,
               feedback: list[Feedback], s: Sampling, seed: int) -> Request:
        return self.propose(view, thoughts, 1, s, seed)

    def parse_refined(self, gens: list[Generation]) -> Reply:
        return self.parse_proposals(gens, 1)

    def merge(self, *args) -> Request:
        raise NotImplementedError(f"the {self.name} style has no merge prompt (can_merge is "
                                  "False)")


class MiniStyle(_Resampling):
    """The tiny models' training format. They were never taught to read test feedback or
    other agents' thoughts, so refinement resamples the thought and merging is not offered
    (``can_merge``); the chat style does both for models that can.

    A thought is the next line of the plan (``thought: step``), or every line up to the code
    header (``thought: plan``): a whole plan in one expansion, so that a budget of a few
    programs reaches complete chains."""

    name = "mini"

    def __init__(self, thought: str = "step") -> None:
        self.plan = thought == "plan"

    def propose(self, view: PublicView, thoughts: list[str], width: int, s: Sampling,
                seed: int) -> Request:
        return Request(render_state(view.prompt, thoughts), n=width, temperature=s.temperature,
                       max_tokens=s.thought_tokens, stop=(CODE_HEADER.strip(),) if self.plan
                       else ("\n",), seed=seed, logprobs=True)

    def parse_proposals(self, gens: list[Generation], width: int) -> Reply:
        thoughts, finished = [], 0
        for g in gens:
            text = g.text
            if "#" in text:  # the code header (or another section): the plan ends there
                text = text[:text.index("#")]
            elif not text.endswith("\n"):  # cut at the length limit: whole lines only
                text = text[:text.rfind("\n") + 1]
            lines = [re.sub(r"^\d+\.\s*", "", line).strip() for line in text.splitlines()]
            lines = [line for line in lines if line][:None if self.plan else 1]
            if not lines:
                finished += g.text.lstrip().startswith("#")
                continue
            text = "\n".join(lines)
            prior = math.exp(g.logprob / max(g.tokens, 1)) if g.logprob is not None \
                else 1.0 / width
            # 4 significant digits: batch composition moves the last bits of a float, and a
            # resumed run must make the same choices as an uninterrupted one
            thoughts.append(Thought(text, float(f"{prior:.4g}")))
        if not thoughts and not finished:
            return Reply(fallback="no thought line")
        return Reply(thoughts=thoughts, done=not thoughts)

    def write(self, view: PublicView, thoughts: list[str] | None, n: int, s: Sampling,
              seed: int) -> Request:
        prompt = render(view.prompt) if thoughts is None else render(view.prompt, thoughts)
        tokens = s.program_tokens + (s.thought_tokens * 3 if thoughts is None else 0)
        return Request(prompt, n=n, temperature=s.temperature, max_tokens=tokens, seed=seed)

    def parse_program(self, text: str, free: bool, view: PublicView
                      ) -> tuple[str | None, list[str]]:
        """The code, and (answering its own way) the thought lines written before it."""
        chain: list[str] = []
        if free:
            if CODE_HEADER not in text:
                return None, []
            plan, text = text.split(CODE_HEADER, 1)
            chain = parse_steps(plan)
        return text.split("\n###", 1)[0], chain


def _show(value: object, limit: int = 400) -> str:
    if isinstance(value, dict) and set(value) == {"repr"}:  # a value JSON cannot hold
        value = value["repr"]
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= limit else text[:limit] + " ..."


class ChatStyle:
    """Instructions and JSON replies, for instruction-tuned models (API, vLLM, HF chat)."""

    name = "chat"
    can_merge = True
    reads_feedback = True
    system = ("You are an expert competitive programmer. You reason in short, concrete steps "
              "and write correct, efficient Python 3.")

    def _problem(self, view: PublicView, examples: int = 3) -> str:
        if view.kind == "function":
            how = f"Implement the function `{view.entry_point}` in Python."
        else:
            how = "Write a Python program that reads standard input and writes standard output."
        shown = []
        for t in view.public_tests[:examples]:
            if isinstance(t, CallTest):
                shown.append(f"{view.entry_point}(*{_show(t.input)}) == {_show(t.output)}")
            elif isinstance(t, StdioTest):
                shown.append(f"input:\n{_show(t.input)}\noutput:\n{_show(t.output)}")
        text = f"## Problem\n{view.prompt}\n\n{how}"
        return text + ("\n\n## Examples\n" + "\n\n".join(shown) if shown else "")

    @staticmethod
    def _chain(thoughts: list[str]) -> str:
        if not thoughts:
            return "## Thoughts so far\n(none yet)"
        return "## Thoughts so far\n" + "".join(f"{i}. {t}\n" for i, t in enumerate(thoughts, 1))

    def _ask(self, text: str, n: int, tokens: int, s: Sampling, seed: int) -> Request:
        return Request((("system", self.system), ("user", text)), n=n,
                       temperature=s.temperature, max_tokens=tokens, seed=seed)

    def __init__(self, thought: str = "step") -> None:
        self.plan = thought == "plan"

    def propose(self, view: PublicView, thoughts: list[str], width: int, s: Sampling,
                seed: int) -> Request:
        what = ("complete plans: the remaining steps of reasoning, one per line within the "
                "thought, up to the point where the program can be written" if self.plan else
                "possible next steps of reasoning towards a solution, each one short step")
        return self._ask(
            f"{self._problem(view)}\n\n{self._chain(thoughts)}\n\nPropose {width} different "
            f"{what}. Rate "
            "each with a prior in [0, 1]: how likely it leads to a correct program. Reply with "
            'JSON only: {"thoughts": [{"thought": "...", "prior": 0.7}], "done": false}. If '
            'the thoughts so far already suffice to write the program, reply {"thoughts": [], '
            '"done": true}.', 1, s.thought_tokens, s, seed)

    def parse_proposals(self, gens: list[Generation], width: int) -> Reply:
        return parse_thoughts(gens[0].text, width) if gens else Reply(fallback="no reply")

    def write(self, view: PublicView, thoughts: list[str] | None, n: int, s: Sampling,
              seed: int) -> Request:
        if thoughts is None:  # its own way: a plan (kept as the program's chain), then code
            ask = ("First write your plan as a short numbered list of steps, then the "
                   "complete solution in one ```python code block.")
        else:
            ask = (f"{self._chain(thoughts)}\n\nFollow these thoughts. Write the complete "
                   "solution in one ```python code block.")
        return self._ask(f"{self._problem(view)}\n\n{ask}", n, s.program_tokens, s, seed)

    def parse_program(self, text: str, free: bool, view: PublicView
                      ) -> tuple[str | None, list[str]]:
        """The code, and (answering its own way) the plan's steps written before it."""
        code = program_in(text, view.entry_point)
        chain = parse_steps(text.split("```", 1)[0]) if free else []
        return (code if code.strip() else None), chain

    def refine(self, view: PublicView, thoughts: list[str], last: str,
               feedback: list[Feedback], s: Sampling, seed: int) -> Request:
        thoughts = [*thoughts, *last.splitlines()]
        failing = "\n\n".join(
            f"input: {_show(f.input)}\nexpected: {_show(f.expected)}\ngot: {_show(f.actual)}"
            + (f"\n({_show(f.detail, 200)})" if f.detail else "") for f in feedback[:3])
        return self._ask(
            f"{self._problem(view)}\n\n{self._chain(thoughts)}\n\nA program written from these "
            f"thoughts fails these tests:\n{failing}\n\nReflect on what is wrong and rewrite "
            'the last thought so that it leads to a correct program. Reply with JSON only: '
            '{"thought": "...", "prior": 0.7}.', 1, s.thought_tokens, s, seed)

    def parse_refined(self, gens: list[Generation]) -> Reply:
        return parse_thoughts(gens[0].text, 1) if gens else Reply(fallback="no reply")

    def merge(self, view: PublicView, thoughts: list[str], candidates: list[str], s: Sampling,
              seed: int) -> Request:
        listed = "".join(f"- {c}\n" for c in candidates)
        return self._ask(
            f"{self._problem(view)}\n\n{self._chain(thoughts)}\n\nOther solvers propose these "
            f"next steps:\n{listed}\nCombine their strengths into one better next step. Reply "
            'with JSON only: {"thought": "...", "prior": 0.7}.', 1, s.thought_tokens, s, seed)


class CompletionStyle(_Resampling):
    """For base (not instruction-tuned) models, which continue text and follow no
    instruction: the problem as a Python docstring, the plan as numbered comments, then the
    function's header for the model to continue. A problem whose prompt is already code
    (HumanEval's signature and docstring) is continued as it is, its plan commented inside
    the body while it proposes, above the prompt when it writes. The program ends where the
    function does (:func:`function_body`: a base model
    keeps writing more functions). A thought is the next comment line, its prior the model's
    per-token geometric-mean probability of it, as in the mini style; such a model reads no
    feedback and merges nothing, so refinement resamples the thought."""

    name = "completion"

    def __init__(self, thought: str = "step") -> None:
        if thought != "step":  # a whole plan in one continuation: not built (not silent)
            raise ValueError("the completion style proposes one plan line at a time: "
                             "set the agent's thought: step")

    @staticmethod
    def _is_code(view: PublicView) -> bool:
        return bool(view.entry_point) and f"def {view.entry_point}(" in view.prompt

    def _state(self, view: PublicView, thoughts: list[str]) -> str:
        """The problem and the plan so far, up to where the next comment line starts."""
        if self._is_code(view):
            head, indent = view.prompt.rstrip() + "\n", "    "
        else:
            examples = "".join(
                f">>> {view.entry_point}({', '.join(map(repr, t.input))})\n{t.output!r}\n"
                for t in view.public_tests[:3] if isinstance(t, CallTest))
            body = view.prompt.strip().replace('"""', "'''")
            head = f'"""{body}\n\n{examples}"""\n' if examples else f'"""{body}\n"""\n'
            indent = ""
        return head + f"{indent}# Plan:\n" + "".join(
            f"{indent}# {i}. {t}\n" for i, t in enumerate(thoughts, 1))

    def _header(self, view: PublicView) -> str:
        """Where the program starts: the model writes the rest of the function."""
        if self._is_code(view) or view.kind != "function" or not view.entry_point:
            return ""
        return f"def {view.entry_point}("

    def propose(self, view: PublicView, thoughts: list[str], width: int, s: Sampling,
                seed: int) -> Request:
        indent = "    " if self._is_code(view) else ""
        return Request(self._state(view, thoughts) + f"{indent}# {len(thoughts) + 1}.",
                       n=width, temperature=s.temperature, max_tokens=s.thought_tokens,
                       stop=("\n",), seed=seed, logprobs=True)

    def parse_proposals(self, gens: list[Generation], width: int) -> Reply:
        thoughts = []
        for g in gens:
            text = g.text.strip()
            if not text or text.startswith(("#", "def ", "import ", "return")):
                continue  # the plan is over: code, not a comment
            prior = math.exp(g.logprob / max(g.tokens, 1)) if g.logprob is not None \
                else 1.0 / width
            thoughts.append(Thought(text, float(f"{prior:.4g}")))
        if not thoughts:
            return Reply(done=True) if gens else Reply(fallback="no reply")
        return Reply(thoughts=thoughts)

    def write(self, view: PublicView, thoughts: list[str] | None, n: int, s: Sampling,
              seed: int) -> Request:
        if self._is_code(view):  # the plan above the prompt: after it the model writes
            plan = "".join(f"# {i}. {t}\n" for i, t in enumerate(thoughts or [], 1))
            prompt = ("# Plan:\n" + plan if plan else "") + view.prompt.rstrip() + "\n"
        else:  # (inside the body it kept writing plan comments, never code: measured)
            prompt = (self._state(view, thoughts) if thoughts else
                      self._state(view, []).rsplit("# Plan:", 1)[0])
        return Request(prompt + self._header(view), n=n, temperature=s.temperature,
                       max_tokens=s.program_tokens, seed=seed)

    def parse_program(self, text: str, free: bool, view: PublicView
                      ) -> tuple[str | None, list[str]]:
        """The function: its header and the model's continuation up to the function's end
        (the prompt itself for a code prompt, whose imports and helpers it needs)."""
        header = self._header(view)
        if header:  # the signature's first line is the model's, then the body
            first, _, rest = text.partition("\n")
            code = header + first + "\n" + function_body(rest)
        else:
            code = view.prompt.rstrip() + "\n" + function_body(text)
        code = parseable_prefix(code)
        return (code if code.strip() and body_written(code, view.entry_point) else None), []


Style = MiniStyle | ChatStyle | CompletionStyle
STYLES: dict[str, Callable[[str], Style]] = {
    "mini": MiniStyle, "chat": ChatStyle, "completion": CompletionStyle}


# ----------------------------------------------------------------------------- the agent

class LLMAgent(Agent):
    def __init__(self, name: str, backend: Backend, style: Style,
                 sampling: Sampling, roles: tuple[str, ...] = ROLES) -> None:
        self.name, self.backend, self.style, self.sampling = name, backend, style, sampling
        self.roles = tuple(roles)

    @property
    def usage(self) -> Usage:
        return self.backend.usage

    @property
    def can_merge(self) -> bool:
        return self.style.can_merge

    async def _ask(self, make: Callable[[int], Request],
                   parse: Callable[[list[Generation]], Reply], seed: int) -> Reply:
        """One call, and one retry with another seed when the reply cannot be used."""
        tokens = 0
        for attempt in range(2):
            done = await self.backend.generate(make(seed + 7919 * attempt))
            tokens += done.tokens
            reply = parse(done.generations)
            if not reply.fallback:
                break
        reply.tokens = tokens
        return reply

    async def propose(self, view, thoughts, width, seed):
        return await self._ask(
            lambda s: self.style.propose(view, thoughts, width, self.sampling, s),
            lambda gens: self.style.parse_proposals(gens, width), seed)

    async def write(self, view, thoughts, n, seed):
        done = await self.backend.generate(
            self.style.write(view, thoughts, n, self.sampling, seed))
        free = thoughts is None
        parsed = [self.style.parse_program(g.text, free, view) for g in done.generations]
        missing = sum(code is None for code, _ in parsed)
        return Reply(programs=[code or "" for code, _ in parsed],
                     chains=[chain for _, chain in parsed], tokens=done.tokens,
                     fallback=f"{missing} of {len(parsed)} replies had no code" if missing
                     else "")

    async def refine(self, view, thoughts, last, feedback, seed):
        return await self._ask(
            lambda s: self.style.refine(view, thoughts, last, feedback, self.sampling, s),
            self.style.parse_refined, seed)

    async def merge(self, view, thoughts, candidates, seed):
        if not self.style.can_merge:
            return Reply(fallback=f"style {self.style.name} cannot merge")
        return await self._ask(
            lambda s: self.style.merge(view, thoughts, candidates, self.sampling, s),
            self.style.parse_refined, seed)
