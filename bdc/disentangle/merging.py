"""Baselines made from the experts: static merges into one adapter (PEFT
``add_weighted_adapter``) and Arrow's training-free per-token routing (PEFT
``create_arrow_model``), the zero-training router a learned hypernetwork has to beat.

Merges: ``uniform`` is the exact average of the experts' deltas (PEFT ``cat`` with weights
1/K: rank K*r, the same model the untrained hypernetwork starts as); ``linear`` is PEFT's
linear merge (A and B averaged apart: cheap, and only an approximation of the average, as
PEFT's docs say); ``ties`` and ``dare`` as PEFT implements them, with the paper code's rates.
"""

from __future__ import annotations

from pathlib import Path

from bdc.config import MergeSettings


def merge(peft_model, experts: list[str], name: str, spec: MergeSettings, seed: int) -> None:
    """Add the merged adapter ``name``. PEFT returns silently, merging nothing, when the name
    exists: an old merge is deleted first. DARE drops weights at random: under ``seed``
    (the global generator untouched), or the same experts merged twice differed and DVC
    re-ran every stage after a run that reused every expert."""
    import torch

    if name in peft_model.peft_config:
        peft_model.delete_adapter(name)
    weight = spec.weight if spec.weight is not None else 1.0 / len(experts)
    kwargs = {"density": spec.density} if spec.density is not None else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model.add_weighted_adapter(experts, [weight] * len(experts), name,
                                        combination_type=spec.combination, **kwargs)
    if name not in peft_model.peft_config:
        raise RuntimeError(f"PEFT did not add the merged adapter {name!r}")


def arrow_model(base_path: str, expert_folders: list[Path], top_k: int, seed: int,
                device: str = "cpu", dtype: str | None = None):
    """A fresh base with the experts under Arrow's router (its prototypes are computed from
    the experts' weights on first use: no training, no data)."""
    from peft import ArrowConfig, create_arrow_model

    from bdc.disentangle.experts import adapter_folder
    from bdc.llm.loading import load_causal_lm

    folders = [adapter_folder(f) for f in expert_folders]
    base, tokenizer = load_causal_lm(base_path, device=device, dtype=dtype)
    model = create_arrow_model(base, folders,
                               ArrowConfig(top_k=min(top_k, len(expert_folders)),
                                           rng_seed=seed))
    return model.eval(), tokenizer
