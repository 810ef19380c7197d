"""One standard PEFT LoRA adapter per input, for serving engines that take one adapter per
request (vLLM): for an input x, the gated rank-K*r LoRA is folded into a plain one.

    A' = diag(s * g(x)) [A_1; ...; A_K],   B' = [B_1 ... B_K],   lora_alpha = r' = K r

so PEFT's scaling alpha / r' is 1 and the expert scaling travels inside A'. A cache keeps
folded adapters by their gates rounded to ``precision``: inputs whose weights round alike
share one adapter (what a server then loads once).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from bdc.customize.config import max_lora_rank
from bdc.customize.model import CustomizedModel


def fold(model: CustomizedModel, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """The folded adapter's weights (PEFT's key names) for one input z of shape (1, d)."""
    with torch.no_grad():
        gates = model.router(z.to(model.device))
    weights = {}
    for name, gate in gates.items():
        layer = model.model.get_submodule(name)
        weights[f"base_model.model.{name}.lora_A.weight"] = \
            (layer.lora_A * (layer.scaling * gate[0])[:, None]).contiguous()
        weights[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.contiguous()
    return weights


def save_folded(model: CustomizedModel, weights: dict[str, torch.Tensor], folder: Path,
                base: str) -> Path:
    """Write a PEFT adapter folder (``PeftModel.from_pretrained`` and vLLM load it)."""
    from peft import LoraConfig, TaskType
    from safetensors.torch import save_file

    rank = model.config.rank
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=model.config.modules,
               task_type=TaskType.CAUSAL_LM, base_model_name_or_path=base,
               ).save_pretrained(str(folder))
    save_file({k: v.detach().cpu().float() for k, v in weights.items()},
              folder / "adapter_model.safetensors")
    return folder


class FoldedCache:
    """Folded adapters under ``root``, keyed by the gates rounded to ``precision``."""

    def __init__(self, model: CustomizedModel, root: Path, base: str,
                 precision: float) -> None:
        self.model, self.root, self.base, self.precision = model, root, base, precision
        self.hits = self.misses = 0

    @property
    def max_lora_rank(self) -> int:
        """What vLLM's ``max_lora_rank`` must be for these adapters."""
        return max_lora_rank(self.model.config.rank)

    def key(self, z: torch.Tensor) -> str:
        with torch.no_grad():
            gates = self.model.router(z.to(self.model.device))
        digest = hashlib.sha256()
        for name in sorted(gates):
            rounded = np.round(gates[name][0].float().cpu().numpy() / self.precision)
            digest.update(name.encode() + rounded.astype(np.int64).tobytes())
        return digest.hexdigest()[:16]

    def adapter(self, z: torch.Tensor) -> Path:
        """The folder of the adapter for input z, folded now or found in the cache."""
        folder = self.root / self.key(z)
        if (folder / "adapter_model.safetensors").exists():
            self.hits += 1
            return folder
        self.misses += 1
        return save_folded(self.model, fold(self.model, z), folder, self.base)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
