"""The mini profile's tiny models: which to train, how (the default and ci settings),
reused when their fingerprint matches, and their measured competence.

The mini world needs agents whose strengths lie *within* a problem, the situation mutual
boosting is for: a planner that learned only the thoughts (good plans, no code) and a coder
that learned only the code (good code from a given plan, no plans of its own). Neither solves
a problem alone; together they do. The base model sees a little of everything for a short
time (weak everywhere, leaving room for experts to help). ``pretraining`` holds the training
itself.

Competence is measured, not assumed: every model writes programs for the ``explore`` and
``test`` problems, which run in the sandbox on their hidden tests, and the agents' room for
boosting is measured as composed vs pooled programs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bdc.config import Params, PretrainModel, TinyModelSettings
from bdc.llm.pretraining import (
    Competence,
    CompetenceNotReached,
    Example,
    encode,
    fast_bf16,
    measure_skill,
    mixture,
    skill_of,
    train,
    train_until,
    training_text,
    write_from_plans,
    write_plans,
    write_programs,
)
from bdc.problems.format import Problem, read_problems
from bdc.problems.mini import first_per_family
from bdc.reuse import TRAINING_RECORD, code_version, digest, finished
from bdc.runtime import cpu_cores
from bdc.sandbox import Sandbox
from bdc.sandbox.scoring import solved

log = logging.getLogger(__name__)
# The ci setting: small, fast and competent where tests need data downstream. Every model
# learns only the arith family, the first of the ci explore pool, and each agent trains until
# it shows its skill (``bdc.llm.pretraining.skill_of``) on the pool's first 10 arith problems:
# a fixed step count does not carry across CPUs or seeds (measured: 700 steps left one CPU's
# planner-coder pair solving nothing; here, seed 0's planner plans 10 of 10 right after 700
# steps and seed 2's 3 of 10; competence jumps sharply with steps). The first cycle is the
# 700 steps that usually suffice; each further one is a warm restart at half the peak
# learning rate, and an agent still short of the skill after the last fails the stage,
# naming it (benchmarks/ci_competence.py measures the margins over seeds and threads). At
# 0.6 each, a planner and a coder both succeed on 2 of those problems at least, and the
# composition is measured on them: it solves something. The base needs
# no skill (nothing downstream relies on it). Always fp32: bf16 autocast, on CPUs that have
# it, is another numerical path.
# two heads of 32: vLLM's CPU attention takes head sizes of 32 and up, and the vLLM tests
# serve the ci models
# the code that makes a tiny model's weights: a change to it trains again
PRETRAIN_CODE = ("llm/pretraining.py", "llm/tiny.py", "llm/prompts.py")
CI_SHAPE = TinyModelSettings(hidden_size=64, layers=2, heads=2, intermediate_size=192,
                             vocab_size=512, max_positions=256)
CI_STEPS, CI_EVAL_PER_FAMILY, CI_LR, CI_FAMILIES = 700, 3, 6e-3, ["arith"]
CI_CYCLES = ((CI_STEPS, CI_LR),) + ((350, CI_LR / 2),) * 4
CI_SKILL, CI_CHECK_PER_FAMILY = 0.6, 10  # a share of up to 10 check problems


def by_family(problems: list[Problem], ok: list[bool]) -> dict:
    groups: dict[str, list[bool]] = defaultdict(list)
    for p, good in zip(problems, ok, strict=True):
        groups[p.meta["family"]].append(good)
    return {"pass@1": float(np.mean(ok)) if ok else 0.0,
            "by_family": {f: float(np.mean(v)) for f, v in sorted(groups.items())}}


def effective(params: Params) -> tuple[TinyModelSettings, dict[str, int], int | None]:
    """Model shape, steps per model and eval problems per family for the chosen setting."""
    pre = params.pretrain
    if pre.setting == "ci":
        return CI_SHAPE, {n: CI_STEPS for n in pre.models}, CI_EVAL_PER_FAMILY
    return params.tiny_model, {n: m.steps for n, m in pre.models.items()}, None


def effective_spec(params: Params, spec: PretrainModel) -> tuple[PretrainModel, float]:
    """The model's data mixture and learning rate for the chosen setting."""
    if params.pretrain.setting == "ci":
        return spec.model_copy(update={"focus": CI_FAMILIES, "focus_share": 1.0}), CI_LR
    return spec, params.pretrain.lr


def use_bf16(params: Params) -> bool:
    if params.pretrain.setting == "ci":
        return False
    bf16 = params.pretrain.bf16
    return fast_bf16() if bf16 == "auto" else bf16


def ci_competence(params: Params, explore: list[Problem]) -> Competence | None:
    """What a ci model must show before its training stops (None: a fixed step count)."""
    if params.pretrain.setting != "ci":
        return None
    check = first_per_family([p for p in explore if p.meta["family"] in CI_FAMILIES],
                             CI_CHECK_PER_FAMILY)
    return Competence(problems=check, at_least=CI_SKILL, cycles=CI_CYCLES)


def fingerprint(shape: TinyModelSettings, spec: PretrainModel, steps: int, params: Params,
                seed: int, corpus: list[Problem], competence: Competence | None = None) -> str:
    """Everything that determines a model's weights; equal fingerprints, equal models (on
    one machine: float training differs across CPUs)."""
    pre = params.pretrain
    spec, lr = effective_spec(params, spec)
    return digest({
        "code": code_version(PRETRAIN_CODE),
        "shape": shape.model_dump(), "spec": spec.model_dump(), "steps": steps, "seed": seed,
        "competence": competence.key() if competence else None,
        "lr": lr, "batch_size": pre.batch_size, "warmup_steps": pre.warmup_steps,
        "min_lr_ratio": pre.min_lr_ratio, "bf16": use_bf16(params),
        "corpus": hashlib.sha256("\n".join(training_text(p)[1] for p in corpus).encode())
        .hexdigest()})


@dataclass
class Corpus:
    """The pretraining texts, the tokenizer every tiny model shares, the encoded examples."""

    problems: list[Problem]
    tokenizer: object
    examples: list[Example]


def corpus_of(params: Params, problems_dir: Path) -> Corpus:
    from bdc.llm.tiny import train_tokenizer

    shape, _, _ = effective(params)
    problems = read_problems(problems_dir / "pretrain.jsonl")
    tokenizer = train_tokenizer([training_text(p)[1] for p in problems], shape.vocab_size)
    return Corpus(problems, tokenizer, encode(tokenizer, problems, shape.max_positions))


def train_or_reuse(params: Params, name: str, spec: PretrainModel, steps: int, seed: int,
                   corpus: Corpus, folder: Path,
                   on_progress: Callable[[str, int, int, float], None] | None = None,
                   competence: Competence | None = None, sandbox: Sandbox | None = None):
    """``(model, training record, reused)``: the model trained with exactly these settings
    if ``folder`` holds it, else trained now and saved there: for ``steps``, or, given a
    ``competence``, until it shows it (judged in ``sandbox``)."""
    from bdc.llm.loading import load_causal_lm
    from bdc.llm.tiny import new_model, save_model

    pre = params.pretrain
    shape, _, _ = effective(params)
    print_ = fingerprint(shape, spec, steps, params, seed, corpus.problems, competence)
    record = finished(folder, print_)
    if record is not None:
        log.info("%s: already trained (fingerprint %s), not retraining", name, print_)
        return load_causal_lm(folder)[0], record, True
    model = new_model(shape, corpus.tokenizer, seed=seed)
    started = time.perf_counter()
    mix, lr = effective_spec(params, spec)
    weights = mixture(corpus.examples, mix)
    pad = corpus.tokenizer.pad_token_id
    record = {"fingerprint": print_}
    if competence is None:
        record["losses"] = train(
            model, corpus.examples, weights, steps, lr, pre.batch_size,
            min(pre.warmup_steps, steps // 4), pre.min_lr_ratio, use_bf16(params), seed, pad,
            lambda step, loss: on_progress and on_progress(name, step + 1, steps, loss),
            spec.loss_on)
    else:
        if sandbox is None:
            raise ValueError(f"{name}: a competence check needs a sandbox to judge programs")

        def measure(trained) -> float:
            return measure_skill(trained, corpus.tokenizer, competence.problems, spec.loss_on,
                                 pre.max_new_tokens, pre.eval_batch_size,
                                 lambda problems, programs: solved(problems, programs,
                                                                   sandbox))
        try:
            record["losses"], record["checks"] = train_until(
                model, corpus.examples, weights, competence, measure, pre.batch_size,
                pre.warmup_steps, pre.min_lr_ratio, use_bf16(params), seed, pad,
                lambda step, planned, loss: on_progress and on_progress(name, step + 1,
                                                                        planned, loss),
                spec.loss_on)
        except CompetenceNotReached as e:
            raise CompetenceNotReached(f"pretrain {name} ({params.pretrain.setting} "
                                       f"setting, seed {seed}): {e}") from None
        log.info("%s: %s on %.2f of %d check problems after %d steps", name,
                 skill_of(spec.loss_on), record["checks"][-1]["skill"],
                 len(competence.problems), len(record["losses"]))
    record["train_seconds"] = round(time.perf_counter() - started, 1)
    record = json.loads(save_model(model, corpus.tokenizer, folder, record=record)
                        .joinpath(TRAINING_RECORD).read_text())
    return model, record, False


def ensure_models(params: Params, specs: dict[str, PretrainModel], models_dir: Path,
                  problems_dir: Path) -> None:
    """Train the tiny models ``specs`` names that ``models_dir`` lacks (or holds stale), as
    the pretrain stage would (``bdc explore-compare`` uses this for its extra agents)."""
    corpus = corpus_of(params, problems_dir)
    for index, (name, spec) in enumerate(specs.items()):
        train_or_reuse(params, name, spec, spec.steps, params.seed + 100 + index, corpus,
                       models_dir / name)


def pretrain(params: Params, problems_dir: Path, models_dir: Path, sandbox: Sandbox,
             on_progress: Callable[[str, int, int, float], None] | None = None,
             on_loss: Callable[[str, int, float], None] | None = None) -> dict:
    """Train every configured model, save it, measure its competence; the metrics."""
    import torch

    # the process's cores, as training sets them: a reused model is measured on the same
    # thread count as a trained one (a search earlier in the process may have lowered it)
    torch.set_num_threads(cpu_cores())
    pre = params.pretrain
    _, steps, eval_limit = effective(params)
    corpus = corpus_of(params, problems_dir)
    tokenizer = corpus.tokenizer
    explore = first_per_family(read_problems(problems_dir / "explore.jsonl"), eval_limit)
    test = first_per_family(read_problems(problems_dir / "test.jsonl"), eval_limit)
    metrics: dict = {"setting": pre.setting, "models": {}, "corpus_examples":
                     len(corpus.examples), "bf16": use_bf16(params)}
    competence = ci_competence(params, read_problems(problems_dir / "explore.jsonl"))
    models = {}
    train_seconds = 0.0
    for index, (name, spec) in enumerate(pre.models.items()):
        model, record, resumed = train_or_reuse(params, name, spec, steps[name],
                                                params.seed + index, corpus,
                                                models_dir / name, on_progress,
                                                competence if spec.role == "agent" else None,
                                                sandbox)
        models[name] = model
        if on_loss:
            for step, loss in enumerate(record["losses"]):
                if step % 10 == 0 or step + 1 == len(record["losses"]):
                    on_loss(name, step, loss)
        losses, seconds = record["losses"], record["train_seconds"]
        train_seconds += seconds
        entry = {"role": spec.role, "loss_on": spec.loss_on, "steps": len(losses),
                 "train_seconds": seconds, "resumed": resumed,
                 "final_loss": float(np.mean(losses[-10:]))}
        if "checks" in record:  # the skill after each training cycle
            entry["competence"] = {"skill": skill_of(spec.loss_on), "at_least": CI_SKILL,
                                   "problems": len(competence.problems),
                                   "checks": record["checks"]}
        for split, problems in (("explore", explore), ("test", test)):  # on its own
            entry[split] = by_family(problems, solved(problems, write_programs(
                model, tokenizer, problems, pre.max_new_tokens, pre.eval_batch_size), sandbox))
        if spec.loss_on == "code":  # a coder: from a given (the reference) plan
            plans = [p.meta["reference"]["thoughts"] for p in explore]
            entry["explore_from_reference_plan"] = by_family(explore, solved(
                explore, write_from_plans(model, tokenizer, explore, plans,
                                          pre.max_new_tokens, pre.eval_batch_size), sandbox))
        metrics["models"][name] = entry
        log.info("%s: loss %.3f, explore pass@1 %.3f, test pass@1 %.3f (%.0fs)", name,
                 entry["final_loss"], entry["explore"]["pass@1"], entry["test"]["pass@1"],
                 seconds)
    metrics["train_seconds"] = round(train_seconds, 1)
    # ci: on the check problems, where the agents' skills make it solve something
    metrics["boosting"] = composition(pre.models, models, tokenizer,
                                      competence.problems if competence else explore, pre,
                                      sandbox)
    return metrics


def composition(specs: dict[str, PretrainModel], models: dict, tokenizer,
                problems: list[Problem], pre, sandbox: Sandbox) -> dict:
    """What the agents can do together that none can alone, at one greedy program each:
    pooled (any agent's own program passes) and, for every planner and coder, composed
    (the coder's program after the planner's plan). The tree of agents searches for such
    compositions; this is the measured room for it."""
    agents = [n for n, s in specs.items() if s.role == "agent"]
    if len(agents) < 2:
        return {}
    alone = {a: solved(problems, write_programs(models[a], tokenizer, problems,
                                                pre.max_new_tokens, pre.eval_batch_size),
                       sandbox) for a in agents}
    pooled = float(np.mean([any(alone[a][i] for a in agents) for i in range(len(problems))]))
    out: dict = {"pooled": pooled, "composed": {}}
    for planner in (a for a in agents if specs[a].loss_on == "thoughts"):
        plans = write_plans(models[planner], tokenizer, problems, pre.max_new_tokens,
                            pre.eval_batch_size)
        out["plans_equal_reference"] = float(np.mean([
            plan == p.meta["reference"]["thoughts"] for plan, p in zip(plans, problems,
                                                                         strict=True)]))
        for coder in (a for a in agents if specs[a].loss_on == "code"):
            ok = solved(problems, write_from_plans(models[coder], tokenizer, problems, plans,
                                                   pre.max_new_tokens, pre.eval_batch_size),
                        sandbox)
            out["composed"][f"{planner}->{coder}"] = float(np.mean(ok))
    if out["composed"]:
        out["composition_gain"] = max(out["composed"].values()) - pooled
    return out


def targets(metrics: dict) -> dict[str, bool]:
    """The mini profile's calibration targets (default setting)."""
    models = metrics["models"]
    bases = [m for m in models.values() if m["role"] == "base"]
    return {
        "pretraining_within_3_minutes": metrics["train_seconds"] <= 180,
        "agents_alone_explore_pass@1_at_most_10pct": all(
            m["explore"]["pass@1"] <= 0.10 for m in models.values() if m["role"] == "agent"),
        "composed_20_points_above_pooled": metrics["boosting"].get("composition_gain", 0)
        >= 0.20,
        "base_test_pass@1_at_most_20pct": all(m["test"]["pass@1"] <= 0.20 for m in bases),
    }
