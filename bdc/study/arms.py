"""The study's arms: how many steps each adapter trains, the adapters themselves (on one
loaded base, reused when nothing that made them changed), and the mixtures over the
cross-fitted experts, the training-free centroid router among them.

Step budgets (docs/study.md): an expert trains ``epochs`` over its cluster's records, at
most ``max_expert_steps``; the full-data LoRA trains the experts' summed steps (equal
compute, so "full" is the pre-registration's "full, equal steps"); the long expert trains
the full LoRA's steps; a size-matched subset trains its expert's steps.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bdc.config import ExpertsSettings, LoraSettings, StudyCapacity
from bdc.customize.config import HypernetConfig
from bdc.disentangle.experts import EXPERT_CODE, ExpertSet, train_adapter, training_rows
from bdc.reuse import code_version, digest, finished, identity
from bdc.study.data import records_digest

log = logging.getLogger(__name__)
STUDY_CODE = (*EXPERT_CODE, "study/arms.py")


def per_epoch(n: int, s: ExpertsSettings) -> int:
    """Optimizer steps in one pass over ``n`` records."""
    return max(1, math.ceil(math.ceil(n / s.micro_batch) / s.accumulation))


def expert_steps(n: int, s: ExpertsSettings, epochs: float, cap: int) -> int:
    return min(math.ceil(per_epoch(n, s) * epochs), cap)


def epochs_for(n: int, steps: int, s: ExpertsSettings) -> float:
    """The (fractional) epochs that make ``Trainer`` run exactly ``steps`` steps over ``n``
    records: it runs ``ceil(epochs * steps per epoch)``, and the cosine schedule spans
    exactly those steps."""
    return (steps - 0.5) / per_epoch(n, s)


def settings_for(experts: ExpertsSettings, capacity: StudyCapacity) -> ExpertsSettings:
    return experts.model_copy(update={"lora": LoraSettings(
        r=capacity.r, alpha=capacity.alpha, dropout=experts.lora.dropout,
        target_modules=capacity.target_modules)})


@dataclass
class AdapterPlan:
    """One adapter to train: its records and its step budget; ``init_from``: an adapter
    planned before it whose weights it starts from (a warm-started expert), else PEFT's
    initialisation (B = 0: the base)."""

    name: str
    records: list[dict]
    steps: int
    init_from: str | None = None


def warm_start(experts: ExpertSet, name: str, source: str) -> None:
    """Adapter ``name`` starts as a copy of adapter ``source`` (both in ``experts``): PEFT's
    own state-dict functions, which drop and add the adapter's name in the keys."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    weights = get_peft_model_state_dict(experts.peft, adapter_name=source)
    loaded = set_peft_model_state_dict(experts.peft, {k: v.clone() for k, v in weights.items()},
                                       adapter_name=name)
    if loaded.unexpected_keys:  # PEFT loads non-strictly: a key mismatch would load nothing
        raise RuntimeError(f"warm start of {name} from {source}: weights not loaded: "
                           f"{loaded.unexpected_keys[:3]}")


def train_adapters(base: str, settings: ExpertsSettings, plans: list[AdapterPlan], seed: int,
                   folder: Path, on_progress=None) -> tuple[ExpertSet, dict[str, dict]]:
    """Every planned adapter in one ``ExpertSet`` (one loaded base): loaded from ``folder``
    when it was trained with the same records, steps, settings, seed and code, else trained
    (its initialisation and data order seeded) and saved there."""
    experts = ExpertSet(base, settings, settings.template)
    records: dict[str, dict] = {}
    for index, plan in enumerate(plans):
        experts.settings = settings.model_copy(update={"seed": seed})
        rows, micro_batch = training_rows(plan.records, experts)
        s = experts.settings = experts.settings.model_copy(update={"epochs": epochs_for(
            len(rows), plan.steps, settings.model_copy(update={"micro_batch": micro_batch}))})
        print_ = digest({"name": plan.name, "base": identity(base), "seed": seed,
                         "template": experts.template.name, "steps": plan.steps,
                         "code": code_version(STUDY_CODE), "lora": s.lora.model_dump(),
                         "train": s.model_dump(include={"lr", "micro_batch", "accumulation",
                                                        "warmup_ratio", "max_length",
                                                        "shared_prefix"}),
                         "data": records_digest(rows),
                         # what it starts from: the source adapter's own fingerprint
                         **({"init": records[plan.init_from]["fingerprint"]}
                            if plan.init_from else {})})
        done = finished(folder / plan.name, print_)
        if on_progress:
            on_progress(plan.name, done is not None, index, len(plans))
        if done is not None:
            experts.load(plan.name, folder / plan.name)
            records[plan.name] = {**done, "reused": True}
            continue
        experts.add(plan.name, seed + index)
        if plan.init_from:
            warm_start(experts, plan.name, plan.init_from)
        work = folder / ".work" / plan.name
        record = {"fingerprint": print_, **train_adapter(
            experts, plan.name, rows, work, micro_batch=micro_batch,
            records=len(plan.records))}
        if record["steps"] != plan.steps:
            raise RuntimeError(f"{plan.name}: trained {record['steps']} steps, planned "
                               f"{plan.steps}")
        record.pop("losses")
        experts.save(plan.name, folder / plan.name, {}, record)
        shutil.rmtree(work, ignore_errors=True)
        records[plan.name] = {**record, "reused": False}
    experts.settings = settings
    return experts, records


class CentroidRouter(nn.Module):
    """The training-free router: each expert weighted by a softmax over the input's cosine
    similarity to the cluster centroids (the last K entries of z), divided by a
    temperature; every rank component of an expert takes its expert's weight (the
    ``expert_softmax`` layout, so a flat similarity is the uniform merge)."""

    def __init__(self, config: HypernetConfig, temperature: float) -> None:
        super().__init__()
        self.config = config
        # a parameter, never trained: the gated model finds the router's device from it
        self.temperature = nn.Parameter(torch.tensor(float(temperature)), requires_grad=False)

    def expert_weights(self, z: torch.Tensor) -> torch.Tensor:
        k = len(self.config.experts)
        return torch.softmax(z[:, -k:].float() / self.temperature, dim=-1)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        gate = self.expert_weights(z).repeat_interleave(self.config.r, dim=1)
        return {m: gate for m in self.config.modules}


def mean_loss(model, rows: list[dict], pad_id: int, batch: int = 16) -> float:
    """The gated model's next-token loss on ``rows`` (output tokens only), weighted by
    tokens: what chooses the centroid router's temperature on the validation records."""
    from bdc.customize.training import GatedCollator

    collate = GatedCollator(pad_id)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            inputs = collate(rows[start:start + batch])
            n = int((inputs["labels"][:, 1:] != -100).sum())
            out = model(**{k: v.to(model.device) for k, v in inputs.items()})
            total, count = total + float(out.loss) * n, count + n
    return total / max(count, 1)
