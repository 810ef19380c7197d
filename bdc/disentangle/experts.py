"""DisenLoRA experts: one LoRA per cluster and one on all the data, trained with the field's
loop (transformers ``Trainer``, loss on the output tokens only) on one loaded, frozen base.

All adapters live in one ``PeftModel`` as named adapters and train one after another: the
base is loaded once, not once per adapter. Each adapter checkpoints under a work folder
(``var/``) so an interrupted run resumes it; a finished adapter whose base, data, template and
settings are unchanged (its ``training.json`` fingerprint) is loaded, not retrained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bdc.config import ExpertsSettings
from bdc.errors import BDCError
from bdc.jsonl import atomic_folder
from bdc.llm.system1 import examples
from bdc.problems.format import Problem
from bdc.reuse import code_version, digest, finished, identity, seal

log = logging.getLogger(__name__)
FULL = "full"  # the adapter trained on all the data
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
# the code that makes an adapter's weights (its training loop, the tokenization and the
# System-1 template): a change to it trains again (bdc.reuse.code_version)
EXPERT_CODE = ("disentangle/experts.py", "llm/system1.py", "llm/prompts.py")


def expert_name(cluster: int) -> str:
    return f"cluster_{cluster}"


def device_and_dtype(settings: ExpertsSettings) -> tuple[str, str]:
    """``(device, dtype name)``: CUDA and bf16 when present (or as set), else CPU fp32."""
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = settings.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    return device, {"bf16": "bfloat16", "fp32": "float32"}[precision]


def lora_config(settings: ExpertsSettings):
    from peft import LoraConfig, TaskType

    lora = settings.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type=TaskType.CAUSAL_LM)


def tokenize(records: list[dict], tokenizer, template, max_length: int) -> list[dict]:
    """Input and output tokenized apart and joined: labels are exactly the output's tokens
    (-100 on the input), and the input is tokenized as inference will tokenize its prompt."""
    rows = []
    for record in records:
        ex = examples(record, template)
        ids_in = tokenizer(ex.input)["input_ids"]
        ids_out = tokenizer(ex.output, add_special_tokens=False)["input_ids"]
        ids = (ids_in + ids_out)[:max_length]
        labels = ([-100] * len(ids_in) + ids_out)[:max_length]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def shared_prefix_rows(records: list[dict], rows: list[dict]) -> list[dict]:
    """``rows`` (:func:`tokenize`'s, one per record) with each P2T row folded into a T2S row
    of its problem that begins with the P2T row's tokens. The System-1 template makes the
    T2S input the P2T input plus its output, so under the causal mask every P2T loss token
    sees the same context inside the T2S row, and one forward and backward gives both
    records' losses (summed over the same loss tokens): the prompt is computed once a
    problem, not twice (``benchmarks/bench_lora.py``). A P2T row whose tokens do not line
    up (a tokenizer that merges across the seam, a T2S row cut by ``max_length``) stays a
    row of its own, after the others (``Trainer`` shuffles them)."""
    hosts: dict[str, list[dict]] = defaultdict(list)
    for record, row in zip(records, rows, strict=True):
        if record["task"] == "t2s":
            hosts[record["problem_id"]].append(row)
    folded: dict[int, dict] = {}  # id of a T2S row -> the P2T row folded into it
    alone = []
    for record, row in zip(records, rows, strict=True):
        if record["task"] != "p2t":
            continue
        n = len(row["input_ids"])
        host = next((h for h in hosts[record["problem_id"]] if id(h) not in folded
                     and h["input_ids"][:n] == row["input_ids"]
                     and all(label == -100 for label in h["labels"][:n])), None)
        if host is None:
            alone.append(row)
        else:
            folded[id(host)] = row
    out = []
    for record, row in zip(records, rows, strict=True):
        if record["task"] == "p2t":
            continue
        p2t = folded.get(id(row))
        if p2t is None:
            out.append(row)
        else:
            n = len(p2t["input_ids"])
            out.append({"input_ids": row["input_ids"],
                        "labels": p2t["labels"] + row["labels"][n:]})
    return out + alone


class Collator:
    """Right-padded batches for training; padding never carries loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_tokens_loss(model, inputs: dict, num_items_in_batch=None):
    """The causal LM loss with the LM head on the positions that carry loss only: a real
    model's head (SmolLM2: 49k-vocabulary logits per token) is a large share of every
    forward and backward, and the prompt's logits were computed only to be ignored. The same
    loss as the model's own (shifted labels, -100 ignored, summed over the accumulated
    batch's loss tokens when ``num_items_in_batch`` is given, else their mean)."""
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=inputs["input_ids"],
                                attention_mask=inputs.get("attention_mask")).last_hidden_state
    target = inputs["labels"][:, 1:]
    keep = target != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:  # Gemma's logits pass through tanh: the same here
        logits = cap * (logits / cap).tanh()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target[keep])
    return F.cross_entropy(logits, target[keep], reduction="sum") / num_items_in_batch


def fingerprint(name: str, base: str, settings: ExpertsSettings, template: str,
                rows: list[dict]) -> str:
    return digest({
        "name": name, "base": identity(base), "template": template,
        "code": code_version(EXPERT_CODE),
        "lora": settings.lora.model_dump(), "seed": settings.seed,
        "train": settings.model_dump(include={"lr", "epochs", "micro_batch", "accumulation",
                                               "warmup_ratio", "max_length",
                                               "shared_prefix"}),
        "data": hashlib.sha256(json.dumps(rows).encode()).hexdigest()})


class ExpertSet:
    """One frozen base and its named LoRA adapters."""

    def __init__(self, base: str, settings: ExpertsSettings, template_kind: str = "auto"):
        from bdc.llm.loading import load_causal_lm
        from bdc.llm.system1 import template_for

        self.base, self.settings = base, settings
        self.device, dtype = device_and_dtype(settings)
        self.model, self.tokenizer = load_causal_lm(base, device=self.device, dtype=dtype)
        self.template = template_for(self.tokenizer, template_kind)
        self.peft = None  # the PeftModel, once the first adapter is in

    @property
    def adapters(self) -> list[str]:
        return [] if self.peft is None else list(self.peft.peft_config)

    def add(self, name: str, seed: int) -> None:
        """A new, untrained adapter (its initialisation seeded)."""
        import torch
        from peft import get_peft_model

        torch.manual_seed(seed)
        if self.peft is None:
            self.peft = get_peft_model(self.model, lora_config(self.settings), adapter_name=name)
        else:
            self.peft.add_adapter(name, lora_config(self.settings))

    def load(self, name: str, folder: Path) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, adapter_folder(folder),
                                                  adapter_name=name)
        else:
            self.peft.load_adapter(adapter_folder(folder), adapter_name=name)

    def save(self, name: str, folder: Path, extra: dict[str, str],
             record: dict | None = None) -> None:
        """PEFT's own format, written atomically: ``PeftModel.from_pretrained`` loads it;
        with its training ``record`` sealed in (``bdc.reuse.seal``) when given."""
        with atomic_folder(folder) as tmp:
            self.peft.save_pretrained(tmp, selected_adapters=[name])
            if (tmp / name).is_dir():  # PEFT saves a named adapter in a subfolder
                for file in (tmp / name).iterdir():
                    file.rename(tmp / file.name)
                (tmp / name).rmdir()
            canonical_adapter_config(tmp)
            for file, text in extra.items():
                (tmp / file).write_text(text)
            if record is not None:
                seal(tmp, record)


class MissingAdapter(BDCError):
    """An adapter folder a stage needs is not there (or holds no adapter)."""


def adapter_folder(folder: Path) -> str:
    """``folder`` as PEFT loads it, once it holds an adapter. PEFT takes any path that is not
    a folder for a hub id: a missing adapter gave a misleading ``HFValidationError`` with the
    real error chained behind it."""
    if not (Path(folder) / "adapter_config.json").is_file():
        raise MissingAdapter(f"{folder}: no adapter there (no adapter_config.json); the "
                             "experts stage makes the adapters: dvc repro experts")
    return str(folder)


def load_adapters(base: str, folder: Path, names: list[str], device: str = "cpu",
                  dtype: str | None = None):
    """The base with each adapter ``folder/<name>`` loaded under its name (PEFT reads their
    format): the expert set of the customize and evaluate stages and the registry."""
    from peft import PeftModel

    from bdc.llm.loading import load_causal_lm

    model, tokenizer = load_causal_lm(base, device=device, dtype=dtype)
    peft = PeftModel.from_pretrained(model, adapter_folder(folder / names[0]),
                                     adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(adapter_folder(folder / name), adapter_name=name)
    return peft, tokenizer


def canonical_adapter_config(folder: Path) -> None:
    """PEFT keeps ``target_modules`` as a set and writes it in the set's order, which changes
    with every process's string hashing: the same adapter saved twice differed, and DVC
    re-ran every stage after experts. Lists of names are written sorted."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save", "layers_to_transform"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key], key=str)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def training_rows(records: list[dict], experts: ExpertSet) -> tuple[list[dict], int]:
    """The rows an adapter of ``records`` trains on, and how many of them a micro-batch
    holds: a row per record and ``micro_batch``; with ``shared_prefix``, each P2T record
    folded into its T2S record (:func:`shared_prefix_rows`) and the micro-batch scaled by
    rows / records, so that a step still holds ``micro_batch`` records on average and an
    epoch about as many steps (a problem's two records now share a step)."""
    s = experts.settings
    rows = tokenize(records, experts.tokenizer, experts.template, s.max_length)
    if not s.shared_prefix or not rows:
        return rows, s.micro_batch
    shared = shared_prefix_rows(records, rows)
    return shared, max(1, round(s.micro_batch * len(shared) / len(rows)))


def train_adapter(experts: ExpertSet, name: str, rows: list[dict], work: Path,
                  on_log: Callable[[str, int, float], None] | None = None,
                  callbacks: list | None = None, micro_batch: int | None = None,
                  records: int | None = None) -> dict:
    """Train one named adapter with ``Trainer``, resuming from its checkpoint if one is
    there; the training record (loss curve, seconds, data size). ``callbacks``: extra
    ``TrainerCallback``s (a benchmark's clock); ``micro_batch`` (rows) and ``records`` (the
    records the rows stand for): :func:`training_rows`'s, when rows were folded."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    class LossTokensTrainer(Trainer):
        """Trainer, with the LM head computed on the loss tokens only (see
        :func:`loss_tokens_loss`)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            loss = loss_tokens_loss(model, inputs, num_items_in_batch)
            return (loss, None) if return_outputs else loss

    s = experts.settings
    experts.peft.set_adapter(name)  # only this adapter is trainable
    trainable = sum(p.numel() for p in experts.peft.parameters() if p.requires_grad)
    micro_batch = micro_batch or s.micro_batch
    steps = math.ceil(math.ceil(len(rows) / micro_batch) / s.accumulation * s.epochs)
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=s.accumulation, num_train_epochs=s.epochs,
        learning_rate=s.lr, warmup_steps=int(s.warmup_ratio * steps),
        lr_scheduler_type="cosine",
        logging_steps=1, save_strategy="steps", save_steps=s.save_steps, save_total_limit=1,
        seed=s.seed, data_seed=s.seed, report_to=[], disable_tqdm=True,
        bf16=device_and_dtype(s)[1] == "bfloat16", use_cpu=experts.device == "cpu",
        dataloader_num_workers=0, remove_unused_columns=False)
    trainer = LossTokensTrainer(model=experts.peft, args=args, train_dataset=rows,
                                data_collator=Collator(experts.tokenizer.pad_token_id),
                                callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the losses go to MLflow, not stdout
    resume = any(work.glob("checkpoint-*"))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    if on_log:
        for step, loss in losses:
            on_log(name, step, loss)
    return {"records": records or len(rows), "rows": len(rows), "micro_batch": micro_batch,
            "trainable_parameters": trainable,
            "steps": trainer.state.global_step, "resumed_from_checkpoint": resume,
            "losses": losses, "train_seconds": round(time.perf_counter() - started, 1)}


def train_all(experts: ExpertSet, datasets: dict[str, list[dict]], out_dir: Path,
              work_dir: Path, on_log: Callable[[str, int, float], None] | None = None,
              on_start: Callable[[str, bool], None] | None = None) -> dict[str, dict]:
    """Every adapter of ``datasets`` (name -> SFT records): reused if finished with these
    inputs, else trained (resuming a checkpoint); all end up loaded in ``experts``."""
    s = experts.settings
    records: dict[str, dict] = {}
    for index, (name, data) in enumerate(datasets.items()):
        rows, micro_batch = training_rows(data, experts)
        print_ = fingerprint(name, experts.base, s, experts.template.name, rows)
        record = finished(out_dir / name, print_)
        if on_start:
            on_start(name, record is not None)
        if record is not None:
            log.info("%s: already trained (fingerprint %s), not retraining", name, print_)
            experts.load(name, out_dir / name)
            records[name] = {**record, "reused": True}
            continue
        experts.add(name, s.seed + index)
        work = work_dir / f"{name}-{print_}"
        record = {"fingerprint": print_, "adapter": name,
                  **train_adapter(experts, name, rows, work, on_log,
                                  micro_batch=micro_batch, records=len(data))}
        experts.save(name, out_dir / name, {}, record)
        shutil.rmtree(work, ignore_errors=True)
        records[name] = {**record, "reused": False}
    return records


def datasets(records: list[dict], assignments: list[dict]) -> dict[str, list[dict]]:
    """``full``: every record; ``cluster_k``: the records of cluster k."""
    cluster = {(a["problem_id"], a["task"]): a["cluster"] for a in assignments}
    out: dict[str, list[dict]] = {FULL: records}
    by: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by[cluster[(r["problem_id"], r["task"])]].append(r)
    for k in sorted(by):
        out[expert_name(k)] = by[k]
    return out


def competence(experts: ExpertSet, test: list[Problem], routes: np.ndarray, k: int,
               sandbox, per_cluster: int) -> dict:
    """Pass@1 (greedy, all hidden tests) on a held-out slice per cluster: the base, the
    full-data LoRA and the cluster's expert, in one mixed-adapter batch. A quick look,
    decided on by nothing: the full comparison (merges and Arrow too) is evaluate's."""
    from bdc.llm.system1 import solve
    from bdc.sandbox.scoring import solved

    s = experts.settings
    table: dict[str, dict[str, float]] = defaultdict(dict)
    rows = []  # (solver kind, cluster, adapter, problem), every cluster in one batch
    for c in range(k):
        chosen = [p for p, r in zip(test, routes.tolist(), strict=True) if r == c][:per_cluster]
        solvers = (("base", BASE_ADAPTER), ("full", FULL), ("expert", expert_name(c)))
        rows += [(kind, c, adapter, p) for kind, adapter in solvers for p in chosen]
    outs = solve(experts.peft, experts.tokenizer, experts.template,
                 [p.prompt for *_, p in rows], s.max_new_tokens, s.generate_batch,
                 adapter_names=[adapter for _, _, adapter, _ in rows])
    ok = solved([p for *_, p in rows], [program for _, program in outs], sandbox)
    for kind, c in {(kind, c) for kind, c, _, _ in rows}:
        mine = [good for (who, cl, _, _), good in zip(rows, ok, strict=True)
                if who == kind and cl == c]
        table[kind][str(c)] = float(np.mean(mine))
    return {solver: {"by_cluster": dict(sorted(row.items())),
                     "mean": float(np.mean(list(row.values())))}
            for solver, row in table.items()}
