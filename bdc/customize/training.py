"""Training the hypernetwork alone (base and experts frozen) with transformers ``Trainer``:
next-token loss on the output tokens (labels shifted inside the model: the authors' code
compared logits[t] with token t), the best epoch by loss on held-out problems, optionally
stopped at a plateau of that loss, checkpoints every epoch to resume from."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bdc import artifacts
from bdc.config import CustomizeSettings, Params
from bdc.customize.model import CustomizedModel
from bdc.disentangle.experts import Collator, tokenize
from bdc.reuse import code_version, digest, file_digest, finished, identity, seal

# the code that makes the hypernetwork's weights: a change to it trains again
HYPERNET_CODE = ("customize/config.py", "customize/layer.py", "customize/model.py",
                 "customize/router.py", "customize/solver.py", "customize/training.py",
                 "disentangle/embedding.py", "disentangle/experts.py", "llm/system1.py",
                 "llm/prompts.py")


def split(records: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Held out by problem, so a problem's P2T and T2S records stay on one side."""
    problems = sorted({r["problem_id"] for r in records})
    random.Random(seed).shuffle(problems)
    held = set(problems[:round(share * len(problems))]) if share else set()
    return [r for r in records if r["problem_id"] not in held], \
        [r for r in records if r["problem_id"] in held]


def rows(records: list[dict], tokenizer, template, max_length: int,
         z: dict[str, np.ndarray]) -> list[dict]:
    out = tokenize(records, tokenizer, template, max_length)
    for row, record in zip(out, records, strict=True):
        row["z"] = z[record["problem_id"]]
    return out


class GatedCollator(Collator):
    def __call__(self, batch: list[dict]) -> dict:
        import torch

        out = super().__call__(batch)
        out["z"] = torch.as_tensor(np.stack([r["z"] for r in batch]))
        return out


def validation_losses(history: list[dict]) -> list[tuple[float, int, float]]:
    """(epoch, step, loss) of each epoch's validation in a Trainer's log history; not the
    untrained model's (epoch 0)."""
    return [(h["epoch"], h["step"], h["eval_loss"]) for h in history
            if "eval_loss" in h and h.get("epoch", 0) > 0]


@dataclass
class Plateau:
    """The validation loss has not fallen below ``(1 - min_improvement)`` times its best for
    ``patience`` epochs in a row. transformers' ``EarlyStoppingCallback`` counts any fall
    above a fixed absolute threshold as progress; the router's loss runs from ~1.3 (a real
    base) to ~0.003 (the study's largest cells), so no one absolute threshold means "a
    plateau" in all of them."""

    patience: int
    min_improvement: float
    best: float = math.inf
    waited: int = 0

    @property
    def reached(self) -> bool:
        return self.waited >= self.patience

    def see(self, loss: float) -> bool:
        """Counts one epoch's validation loss; True once the plateau is reached."""
        if loss < self.best * (1 - self.min_improvement):
            self.best, self.waited = loss, 0
        else:
            self.waited += 1
        return self.reached

    def replay(self, history: list[dict]) -> bool:
        """The count rebuilt from a Trainer's log history (a checkpoint's), so that a
        resumed run stops where an uninterrupted one would."""
        self.best, self.waited = math.inf, 0
        for _, _, loss in validation_losses(history):
            self.see(loss)
        return self.reached

    def callback(self):
        """The ``Trainer`` callback that stops training at the plateau."""
        from transformers import TrainerCallback

        plateau = self

        class StopAtPlateau(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                plateau.replay(state.log_history)

            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                if state.epoch and plateau.see(metrics["eval_loss"]):
                    control.should_training_stop = True

        return StopAtPlateau()


def train(model: CustomizedModel, train_rows: list[dict], val_rows: list[dict],
          settings: CustomizeSettings, pad_id: int, work: Path,
          on_log: Callable[[str, int, float], None] | None = None) -> dict:
    from transformers import PrinterCallback, Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    s = settings
    steps = math.ceil(math.ceil(len(train_rows) / s.batch) * s.epochs)
    evaluate = bool(val_rows)
    plateau = None
    if s.patience is not None:
        if not evaluate:
            raise ValueError("customize.patience: no validation records to find a plateau on")
        plateau = Plateau(s.patience, s.min_improvement)
    last = get_last_checkpoint(str(work)) if work.is_dir() else None
    # resumed from the checkpoint where the plateau was reached, it trains nothing more
    # (Trainer runs a step before any callback can stop it: one more epoch, maybe a new best)
    stopped_at = None
    if plateau and last:
        state = json.loads((Path(last) / "trainer_state.json").read_text())
        if plateau.replay(state["log_history"]):
            stopped_at = state["global_step"]
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=s.batch,
        per_device_eval_batch_size=max(s.batch, 8), num_train_epochs=s.epochs,
        max_steps=stopped_at or -1,
        learning_rate=s.lr, weight_decay=s.weight_decay, optim="adamw_torch",
        lr_scheduler_type=s.scheduler, logging_steps=max(1, steps // 200),
        eval_strategy="epoch" if evaluate else "no", save_strategy="epoch",
        save_total_limit=2, load_best_model_at_end=evaluate,
        metric_for_best_model="eval_loss" if evaluate else None, greater_is_better=False,
        seed=s.seed, data_seed=s.seed, report_to=[], disable_tqdm=True, use_cpu=(
            model.device.type == "cpu"), dataloader_num_workers=0,
        remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows,
                      eval_dataset=val_rows or None, data_collator=GatedCollator(pad_id))
    trainer.remove_callback(PrinterCallback)
    if plateau:
        trainer.add_callback(plateau.callback())
    resume = last is not None
    # the untrained hypernetwork is the uniform merge: its loss is the bar to clear
    initial = trainer.evaluate()["eval_loss"] if evaluate and not resume else None
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    history = trainer.state.log_history
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    validated = validation_losses(history)
    evals = [(epoch, loss) for epoch, _, loss in validated]
    # the validation loss on the training loss's axis, at the step it was measured (it was
    # drawn at x = its epoch, 1..5 on a 1..130 step axis)
    val_steps = [(step, loss) for _, step, loss in validated]
    if on_log:
        for step, loss in losses:
            on_log("train_loss", step, loss)
        for step, loss in val_steps:
            on_log("val_loss", step, loss)
    best = min(evals, key=lambda e: e[1]) if evals else None
    return {"train_records": len(train_rows), "val_records": len(val_rows),
            "steps": trainer.state.global_step, "max_steps": steps,
            "epochs": trainer.state.epoch,
            # the plateau was reached (False: it ran every epoch it had, the loss maybe still
            # falling; None: no patience, not looked for)
            "plateaued": plateau.reached if plateau else None,
            "resumed_from_checkpoint": resume,
            "losses": losses, "val_losses": evals, "val_steps": val_steps,
            "initial_val_loss": initial,
            "best_epoch": best[0] if best else None, "best_val_loss": best[1] if best else None,
            "train_seconds": round(time.perf_counter() - started, 1)}


def fingerprint(params: Params, experts_dir: Path, experts: list[str], clusters_dir: Path,
                records: list[dict]) -> str:
    """Everything the hypernetwork's weights depend on: the experts (their own training
    fingerprints), its settings, the base and template, the routing and the data."""
    return digest({
        "code": code_version(HYPERNET_CODE),
        "experts": {n: identity(experts_dir / n) for n in experts},
        "settings": params.customize.model_dump(),
        "template": params.experts.template, "base": params.experts.base,
        "centroids": file_digest(clusters_dir / artifacts.CENTROIDS),
        "embedder": json.loads((clusters_dir / artifacts.EMBEDDER).read_text())["identity"],
        "data": hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()})


def train_or_reuse(solver, records: list[dict], z: dict, params: Params, experts_dir: Path,
                   experts: list[str], clusters_dir: Path, out_dir: Path, work_root: Path,
                   on_log: Callable[[str, int, float], None] | None = None) -> dict:
    """The hypernetwork of ``out_dir`` loaded into ``solver`` when it was trained with
    exactly this fingerprint; else trained now (resuming from ``work_root``'s checkpoints)
    and saved there whole or not at all. Its training record, with ``reused``."""
    import torch

    s = params.customize
    print_ = fingerprint(params, experts_dir, experts, clusters_dir, records)
    record = finished(out_dir, print_)
    if record is not None:
        solver.model.load(out_dir)
        record["reused"] = True
    else:
        torch.manual_seed(s.seed)
        train_records, val_records = split(records, s.validation_share, s.seed)
        tok = solver.tokenizer
        length = params.experts.max_length
        work = work_root / print_
        record = {"fingerprint": print_, **train(
            solver.model, rows(train_records, tok, solver.template, length, z),
            rows(val_records, tok, solver.template, length, z), s, tok.pad_token_id,
            work, on_log)}
        tmp = Path(tempfile.mkdtemp(prefix=".hypernet.", dir=out_dir.parent))
        solver.save(tmp)
        record = seal(tmp, record)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        shutil.rmtree(work, ignore_errors=True)
        record["reused"] = False
    return record
