"""Training the mini profile's tiny models from scratch: data, mixture, loop, generation.

The mini world needs models that really learn and really differ: each model sees a mixture of
the problem families (``focus``) and learns a part of each text (``loss_on``): a generalist
learns thoughts and code, a planner only the thoughts, a coder only the code. Training is a
fixed number of steps with a fixed seed, reproducible on one machine (float training is not
bit-identical across CPUs).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bdc.config import PretrainModel
from bdc.llm.prompts import CODE_HEADER, parse_steps, render
from bdc.problems.format import Problem
from bdc.runtime import cpu_cores


@dataclass
class Example:
    ids: list[int]  # the whole text: problem, thoughts, code header, code, end of text
    prompt_len: int  # tokens of "### Problem ... ### Thoughts\n"
    family: str
    code_start: int = 0  # first token after "### Code\n" (0: not computed)


def training_text(problem: Problem) -> tuple[str, str]:
    """(prompt part, full text) of a pretrain problem, from its reference chain."""
    ref = problem.meta["reference"]
    return render(problem.prompt), render(problem.prompt, ref["thoughts"], ref["program"])


def encode(tokenizer, problems: list[Problem], max_len: int) -> list[Example]:
    prompts, texts = zip(*(training_text(p) for p in problems), strict=True)
    chains = [render(p.prompt, p.meta["reference"]["thoughts"]) for p in problems]
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    chain_ids = tokenizer(chains)["input_ids"]
    text_ids = tokenizer(list(texts))["input_ids"]
    return [Example(ids=(ids + [tokenizer.eos_token_id])[:max_len], prompt_len=len(pids),
                    family=p.meta["family"], code_start=min(len(cids), max_len))
            for p, pids, cids, ids in zip(problems, prompt_ids, chain_ids, text_ids,
                                          strict=True)]


def loss_span(example: Example, loss_on: str) -> tuple[int, int]:
    """Which tokens carry loss. ``all``: thoughts and code (a generalist); ``thoughts``: the
    thoughts and the ``### Code`` header, so the model plans and then hands over (a planner);
    ``code``: the code and the end of text, so the model writes code from a given plan but
    never learns to plan (a coder). The problem text never carries loss: learning to model
    its random constants ruins a planner (mini-calibration: 38% -> 3.5% exact chains)."""
    n = len(example.ids)
    if loss_on == "thoughts":
        return example.prompt_len, example.code_start
    if loss_on == "code":
        return example.code_start, n
    return example.prompt_len, n


def mixture(examples: list[Example], spec: PretrainModel) -> np.ndarray:
    """Sampling probability per example: ``focus_share`` of the mass on focus families."""
    families = sorted({e.family for e in examples})
    focus = [f for f in spec.focus if f in families]
    other = [f for f in families if f not in focus]
    share = {f: 1 / len(families) for f in families}
    if focus and other:
        share = {**{f: spec.focus_share / len(focus) for f in focus},
                 **{f: (1 - spec.focus_share) / len(other) for f in other}}
    counts = defaultdict(int)
    for e in examples:
        counts[e.family] += 1
    weights = np.array([share[e.family] / counts[e.family] for e in examples])
    return weights / weights.sum()


def _batch(examples: list[Example], pad_id: int, loss_on: str = "all") -> dict[str, torch.Tensor]:
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        mask[row, :n] = 1
        lo, hi = loss_span(e, loss_on)
        labels[row, lo:hi] = torch.tensor(e.ids[lo:hi])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grouped_batches(rng: np.random.Generator, examples: list[Example], weights: np.ndarray,
                     batch_size: int, group: int = 8) -> list[list[int]]:
    """``group`` batches drawn by the mixture, then regrouped by length: the same examples,
    far less padding (about 30% of the compute, unsorted)."""
    picks = rng.choice(len(examples), size=batch_size * group, p=weights)
    picks = sorted(picks, key=lambda i: len(examples[i].ids))
    batches = [list(picks[i:i + batch_size]) for i in range(0, len(picks), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_at(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(model, examples: list[Example], weights: np.ndarray, steps: int, lr: float,
          batch_size: int, warmup: int, min_lr_ratio: float, bf16: bool, seed: int, pad_id: int,
          on_step: Callable[[int, float], None] | None = None,
          loss_on: str = "all") -> list[float]:
    """Train in place; the loss of every step."""
    torch.set_num_threads(cpu_cores())  # undo a search's share_cpu in this process
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, steps, warmup, min_lr_ratio))
    model.train()
    losses = []
    queue: list[list[int]] = []
    for step in range(steps):
        if not queue:
            queue = _grouped_batches(rng, examples, weights, batch_size)
        batch = _batch([examples[i] for i in queue.pop()], pad_id, loss_on)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return losses


class CompetenceNotReached(RuntimeError):
    """A model trained for every cycle it was allowed still lacks the skill it must show."""


@dataclass(frozen=True)
class Competence:
    """A skill a model must show before its training stops, measured on held-out problems.

    Float training differs across CPUs (and thread counts): a fixed step count that makes a
    tiny model competent on one machine can leave it solving nothing on another, since its
    competence jumps sharply with steps. Where later work needs a competent model (the ci
    setting: tests downstream need real search data), training runs in annealed cycles until
    this skill is measured, and fails loudly when ``cycles`` run out."""

    problems: list[Problem]
    at_least: float  # share of ``problems``
    cycles: tuple[tuple[int, float], ...]  # (steps, peak lr) of each warm-restarted cycle

    def key(self) -> dict:
        """What the trained weights depend on, for a reuse fingerprint."""
        return {"problems": [p.id for p in self.problems], "at_least": self.at_least,
                "cycles": [list(c) for c in self.cycles]}


def skill_of(loss_on: str) -> str:
    """What a model that learned ``loss_on`` must be able to do: a planner's greedy plans
    equal the reference plans; a coder's code from the reference plans passes the hidden
    tests; a generalist's own programs pass them."""
    return {"thoughts": "plans equal to the reference", "code": "solved from the reference "
            "plan", "all": "solved alone"}[loss_on]


def measure_skill(model, tokenizer, problems: list[Problem], loss_on: str, max_new_tokens: int,
                  batch_size: int, judge: Callable[[list[Problem], list[str]], list[bool]]
                  ) -> float:
    """The share of ``problems`` on which the model shows its skill (``skill_of``);
    ``judge`` runs programs on the hidden tests (the sandbox)."""
    if loss_on == "thoughts":
        plans = write_plans(model, tokenizer, problems, max_new_tokens, batch_size)
        ok = [plan == p.meta["reference"]["thoughts"] for plan, p in zip(plans, problems,
                                                                         strict=True)]
    elif loss_on == "code":
        ok = judge(problems, write_from_plans(model, tokenizer, problems, [
            p.meta["reference"]["thoughts"] for p in problems], max_new_tokens, batch_size))
    else:
        ok = judge(problems, write_programs(model, tokenizer, problems, max_new_tokens,
                                            batch_size))
    return float(np.mean(ok)) if ok else 0.0


def train_until(model, examples: list[Example], weights: np.ndarray, competence: Competence,
                measure: Callable[[object], float], batch_size: int, warmup: int,
                min_lr_ratio: float, bf16: bool, seed: int, pad_id: int,
                on_step: Callable[[int, int, float], None] | None = None,
                loss_on: str = "all") -> tuple[list[float], list[dict]]:
    """Train in place, cycle by cycle (each a warm restart: warm-up, cosine decay, a fresh
    optimizer, its own seed), until ``measure(model)`` reaches ``competence.at_least``.
    ``(losses of every step, the check after each cycle)``; raises
    ``CompetenceNotReached`` with every check when the last cycle ends short of it.
    ``on_step(step, planned steps, loss)`` counts over all cycles."""
    losses: list[float] = []
    checks: list[dict] = []
    for cycle, (steps, lr) in enumerate(competence.cycles):
        done, planned = len(losses), len(losses) + steps

        def step_done(step: int, loss: float, done: int = done, planned: int = planned) -> None:
            if on_step:
                on_step(done + step, planned, loss)

        losses += train(model, examples, weights, steps, lr, batch_size,
                        min(warmup, steps // 4), min_lr_ratio, bf16, seed + 1000 * cycle,
                        pad_id, step_done, loss_on)
        checks.append({"steps": len(losses), "skill": measure(model)})
        if checks[-1]["skill"] >= competence.at_least:
            return losses, checks
    raise CompetenceNotReached(
        f"after {len(losses)} steps in {len(checks)} cycles the model has "
        f"{skill_of(loss_on)} on a share of {checks[-1]['skill']:.2f} of "
        f"{len(competence.problems)} check problems (after each cycle: "
        f"{', '.join(format(c['skill'], '.2f') for c in checks)}); it must reach "
        f"{competence.at_least:.2f}. Float training differs across CPUs and thread counts: "
        "allow more cycles or check the training data")


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             temperature: float | None = None, seed: int = 0) -> list[str]:
    """One completion per prompt: greedy, or sampled at ``temperature``."""
    torch.manual_seed(seed)
    texts = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} \
            if temperature is not None else {"do_sample": False}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **sampling,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                        skip_special_tokens=True)
    return texts


def write_programs(model, tokenizer, problems: list[Problem], max_new_tokens: int,
                   batch_size: int, temperature: float | None = None, seed: int = 0) -> list[str]:
    """One program per problem, the model planning on its own first."""
    return [extract_program(t) for t in complete(
        model, tokenizer, [render(p.prompt) for p in problems], max_new_tokens, batch_size,
        temperature, seed)]


def write_plans(model, tokenizer, problems: list[Problem], max_new_tokens: int,
                batch_size: int) -> list[list[str]]:
    """One greedy plan (the thought lines before the code header) per problem."""
    return [parse_steps(t.split(CODE_HEADER, 1)[0]) for t in complete(
        model, tokenizer, [render(p.prompt) for p in problems], max_new_tokens, batch_size)]


def write_from_plans(model, tokenizer, problems: list[Problem], plans: list[list[str]],
                     max_new_tokens: int, batch_size: int) -> list[str]:
    """One greedy program per problem, written after the given plan."""
    return [t.split("\n###", 1)[0] for t in complete(
        model, tokenizer, [render(p.prompt, plan) for p, plan in zip(problems, plans,
                                                                    strict=True)],
        max_new_tokens, batch_size)]


def extract_program(completion: str) -> str:
    """The code after the ``### Code`` header (empty when the model never got there)."""
    return completion.split(CODE_HEADER, 1)[1] if CODE_HEADER in completion else ""


def fast_bf16() -> bool:
    """Does this CPU compute bfloat16 natively (AVX512-BF16 or AMX)? Where it does, bf16
    autocast trains the tiny models ~1.4x faster (mini-calibration); where it does not
    (AVX2 only), torch emulates it and a step was 12x slower (2.6 s vs 0.22 s, measured)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
