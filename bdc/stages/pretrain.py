"""Stage ``pretrain`` (mini profile): tiny agents and a System-1 base model, from scratch.

The mini world needs models that really learn and really differ: each agent sees mostly its
own half of the problem families (so two agents together know more than either alone, which
is what boosting exploits), and the base model sees a little of everything for a short time
(weak everywhere, leaving room for experts to help). Training is a fixed number of steps with
a fixed seed, so a run is reproducible; the loss is on thoughts and code only.

Competence is measured, not assumed: every model writes programs for the ``explore`` and
``test`` problems, which run in the sandbox on their hidden tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bdc.config import Params, PretrainModel, TinyModelSettings
from bdc.jsonl import atomic_open
from bdc.problems.format import Problem, Sample, read_problems
from bdc.problems.mini import first_per_family, render
from bdc.sandbox import Sandbox
from bdc.scoring import SampleScore, score_samples

log = logging.getLogger(__name__)
CI_SHAPE = TinyModelSettings(hidden_size=64, layers=2, heads=2, intermediate_size=128,
                             vocab_size=512, max_positions=256)
CI_STEPS, CI_EVAL_PER_FAMILY = 25, 3


@dataclass
class Example:
    ids: list[int]
    prompt_len: int  # tokens of "### Problem ... ### Thoughts\n": no loss there
    family: str


def training_text(problem: Problem) -> tuple[str, str]:
    """(prompt part, full text) of a pretrain problem, from its reference chain."""
    ref = problem.meta["reference"]
    return render(problem.prompt), render(problem.prompt, ref["thoughts"], ref["program"])


def encode(tokenizer, problems: list[Problem], max_len: int) -> list[Example]:
    prompts, texts = zip(*(training_text(p) for p in problems), strict=True)
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    text_ids = tokenizer(list(texts))["input_ids"]
    return [Example(ids=(ids + [tokenizer.eos_token_id])[:max_len], prompt_len=len(pids),
                    family=p.meta["family"])
            for p, pids, ids in zip(problems, prompt_ids, text_ids, strict=True)]


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


def _batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        mask[row, :n] = 1
        labels[row, e.prompt_len:n] = torch.tensor(e.ids[e.prompt_len:])
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
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train in place; the loss of every step."""
    torch.set_num_threads(os.cpu_count() or 1)
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
        batch = _batch([examples[i] for i in queue.pop()], pad_id)
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


@torch.no_grad()
def write_programs(model, tokenizer, problems: list[Problem], max_new_tokens: int,
                   batch_size: int, temperature: float | None = None, seed: int = 0) -> list[str]:
    """One program per problem: greedy, or sampled at ``temperature``."""
    torch.manual_seed(seed)
    programs = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        enc = tokenizer([render(p.prompt) for p in chunk], return_tensors="pt", padding=True)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} \
            if temperature is not None else {"do_sample": False}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **sampling,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                       skip_special_tokens=True)
        programs += [extract_program(t) for t in texts]
    return programs


def extract_program(completion: str) -> str:
    """The code after the ``### Code`` header (empty when the model never got there)."""
    return completion.split("### Code\n", 1)[1] if "### Code\n" in completion else ""


def solved(problems: list[Problem], programs: list[str], sandbox: Sandbox) -> list[bool]:
    """Does each program pass all of its problem's hidden tests?"""
    by_id = {p.id: p for p in problems}
    samples = [Sample(problem_id=p.id, program=code) for p, code in zip(problems, programs,
                                                                        strict=True)]
    scores: list[SampleScore] = list(score_samples(by_id, samples, sandbox, "hidden"))
    return [s.status == "passed" for s in scores]


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


TRAINING_RECORD = "training.json"


def fingerprint(shape: TinyModelSettings, spec: PretrainModel, steps: int, params: Params,
                seed: int, corpus: list[Problem]) -> str:
    """Everything that determines a model's weights; equal fingerprints, equal models."""
    pre = params.pretrain
    blob = json.dumps({
        "shape": shape.model_dump(), "spec": spec.model_dump(), "steps": steps, "seed": seed,
        "lr": pre.lr, "batch_size": pre.batch_size, "warmup_steps": pre.warmup_steps,
        "min_lr_ratio": pre.min_lr_ratio, "bf16": pre.bf16,
        "corpus": hashlib.sha256("\n".join(training_text(p)[1] for p in corpus).encode())
        .hexdigest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def finished_training(folder: Path, print_: str) -> dict | None:
    """The training record of a model already trained with this fingerprint, if any."""
    try:
        record = json.loads((folder / TRAINING_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("fingerprint") == print_ else None


def pretrain(params: Params, problems_dir: Path, models_dir: Path, sandbox: Sandbox,
             on_progress: Callable[[str, int, int, float], None] | None = None,
             on_loss: Callable[[str, int, float], None] | None = None) -> dict:
    """Train every configured model, save it, measure its competence; the metrics."""
    from bdc.tiny_model import new_model, save_model, train_tokenizer

    pre = params.pretrain
    shape, steps, eval_limit = effective(params)
    corpus = read_problems(problems_dir / "pretrain.jsonl")
    explore = first_per_family(read_problems(problems_dir / "explore.jsonl"), eval_limit)
    test = first_per_family(read_problems(problems_dir / "test.jsonl"), eval_limit)
    tokenizer = train_tokenizer([training_text(p)[1] for p in corpus], shape.vocab_size)
    examples = encode(tokenizer, corpus, shape.max_positions)
    metrics: dict = {"setting": pre.setting, "models": {}, "corpus_examples": len(examples)}
    greedy: dict[str, dict[str, list[bool]]] = {}
    second: dict[str, list[bool]] = {}
    train_seconds = 0.0
    for index, (name, spec) in enumerate(pre.models.items()):
        seed = params.seed + index
        print_ = fingerprint(shape, spec, steps[name], params, seed, corpus)
        record = finished_training(models_dir / name, print_)
        resumed = record is not None
        if resumed:  # resume: this exact model was trained by an earlier run
            from bdc.models import load_causal_lm

            log.info("%s: already trained (fingerprint %s), not retraining", name, print_)
            model, _ = load_causal_lm(models_dir / name)
        else:
            model = new_model(shape, tokenizer, seed=seed)
            started = time.perf_counter()

            def step_done(step: int, loss: float, name: str = name) -> None:
                if on_progress:
                    on_progress(name, step + 1, steps[name], loss)

            losses = train(model, examples, mixture(examples, spec), steps[name], pre.lr,
                           pre.batch_size, min(pre.warmup_steps, steps[name] // 4),
                           pre.min_lr_ratio, pre.bf16, seed, tokenizer.pad_token_id,
                           step_done)
            record = {"fingerprint": print_, "losses": losses,
                      "train_seconds": round(time.perf_counter() - started, 1)}
            save_model(model, tokenizer, models_dir / name, {TRAINING_RECORD: json.dumps(record)})
        if on_loss:
            for step, loss in enumerate(record["losses"]):
                if step % 10 == 0 or step + 1 == len(record["losses"]):
                    on_loss(name, step, loss)
        losses, seconds = record["losses"], record["train_seconds"]
        train_seconds += seconds
        greedy[name] = {
            split: solved(problems, write_programs(model, tokenizer, problems,
                                                   pre.max_new_tokens, pre.eval_batch_size),
                          sandbox)
            for split, problems in (("explore", explore), ("test", test))}
        if spec.role == "agent":  # a second, sampled program: the equal-budget baseline
            second[name] = solved(explore, write_programs(
                model, tokenizer, explore, pre.max_new_tokens, pre.eval_batch_size,
                temperature=pre.sample_temperature, seed=params.seed + index), sandbox)
        metrics["models"][name] = {
            "role": spec.role, "steps": steps[name], "train_seconds": seconds,
            "resumed": resumed,
            "final_loss": float(np.mean(losses[-10:])),
            "explore": by_family(explore, greedy[name]["explore"]),
            "test": by_family(test, greedy[name]["test"])}
        log.info("%s: loss %.3f, explore pass@1 %.3f, test pass@1 %.3f (%.0fs)", name,
                 metrics["models"][name]["final_loss"],
                 metrics["models"][name]["explore"]["pass@1"],
                 metrics["models"][name]["test"]["pass@1"], seconds)
    metrics["train_seconds"] = round(train_seconds, 1)
    metrics["boosting"] = _boosting(greedy, second)
    return metrics


def _boosting(greedy: dict, second: dict) -> dict:
    """Two programs per explore problem either way: both from one agent (greedy + sampled),
    or one from each agent (greedy). The union is what a two-agent search can draw on."""
    agents = list(second)
    if len(agents) < 2:
        return {}
    alone = {a: float(np.mean([g or s for g, s in zip(greedy[a]["explore"], second[a],
                                                       strict=True)])) for a in agents}
    union = float(np.mean([any(greedy[a]["explore"][i] for a in agents)
                           for i in range(len(second[agents[0]]))]))
    return {"alone_budget2": alone, "union_budget2": union,
            "union_gain": union - max(alone.values())}


def targets(metrics: dict) -> dict[str, bool]:
    """The mini profile's calibration targets (default setting)."""
    models = metrics["models"]
    agents = [m for m in models.values() if m["role"] == "agent"]
    bases = [m for m in models.values() if m["role"] == "base"]
    return {
        "pretraining_within_5_minutes": metrics["train_seconds"] <= 300,
        "agents_explore_pass@1_10_to_60pct": all(0.10 <= m["explore"]["pass@1"] <= 0.60
                                                 for m in agents),
        "union_10_points_above_each_agent": metrics["boosting"].get("union_gain", 0) >= 0.10,
        "base_test_pass@1_at_most_30pct": all(m["test"]["pass@1"] <= 0.30 for m in bases),
    }


def competence_rows(metrics: dict) -> list[dict]:
    return [{"model": name, "split": split, "family": family, "pass@1": value}
            for name, m in metrics["models"].items() for split in ("explore", "test")
            for family, value in [*m[split]["by_family"].items(), ("all", m[split]["pass@1"])]]


def run(params: Params, problems_dir: Path, models_dir: Path, metrics_path: Path,
        plots_dir: Path, on_progress=None) -> dict:
    """The stage with its MLflow run: loss curves, competence table, targets."""
    from bdc.tracking import stage_run

    loss_rows: list[dict] = []
    with stage_run("pretrain", {"pretrain": params.pretrain.model_dump(),
                                "tiny_model": params.tiny_model.model_dump(),
                                "seed": params.seed}, params.profile) as tracked, \
            Sandbox(params.sandbox) as sandbox:

        def on_loss(name: str, step: int, loss: float) -> None:
            loss_rows.append({"model": name, "step": step, "loss": loss})
            tracked.metrics({f"loss.{name}": loss}, step=step)

        metrics = pretrain(params, problems_dir, models_dir, sandbox, on_progress, on_loss)
        if params.pretrain.setting == "default":
            metrics["targets"] = targets(metrics)
        rows = competence_rows(metrics)
        # outputs first: a tracking failure must not lose what was measured
        with atomic_open(metrics_path) as f:
            json.dump(metrics, f, indent=2)
        with atomic_open(plots_dir / "pretrain_loss.csv") as f:
            f.write("model,step,loss\n" + "".join(
                f"{r['model']},{r['step']},{r['loss']:.4f}\n" for r in loss_rows))
        with atomic_open(plots_dir / "competence.csv") as f:
            f.write("model,split,family,pass_at_1\n" + "".join(
                f"{r['model']},{r['split']},{r['family']},{r['pass@1']:.3f}\n" for r in rows))
        tracked.metrics({k: v for k, v in metrics.items() if k != "models"})
        tracked.metrics({"models": metrics["models"]})
        tracked.table(rows, "competence.json")
        tracked.figure(_loss_figure(loss_rows), "loss_curves.png")
        tracked.artifact(metrics_path)
    return metrics


def _loss_figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for name in sorted({r["model"] for r in rows}):
        pts = [(r["step"], r["loss"]) for r in rows if r["model"] == name]
        ax.plot(*zip(*pts, strict=True), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (thoughts + code)")
    ax.legend()
    fig.tight_layout()
    return fig
