"""The hypernetwork's configuration, as PEFT keeps an adapter's: what it was built over (the
experts, their rank and scaling, the adapted modules) and how (hidden size, normalisation),
saved beside its weights as ``hypernet_config.json``. The user-facing settings are
``customize`` in params.yaml (``bdc.config.CustomizeSettings``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG_NAME = "hypernet_config.json"


@dataclass
class HypernetConfig:
    experts: list[str]  # adapter names, in the order their rank components are stacked
    r: int  # each expert's rank
    scaling: float  # each expert's LoRA scaling, alpha / r
    modules: list[str]  # adapted module names in the base model
    z_dim: int  # embedding dimension + one cosine per centroid
    hidden: int = 64
    normalisation: str = "all_softmax"

    @property
    def rank(self) -> int:
        """The rank of the gated LoRA (and of a folded adapter): K * r."""
        return len(self.experts) * self.r

    def save(self, folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> HypernetConfig:
        return cls(**json.loads((folder / CONFIG_NAME).read_text()))


VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts for adapters of ``rank``."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"rank {rank} is above vLLM's largest max_lora_rank ({VLLM_RANKS[-1]})")


def layer_indices(spec: str | list[int], n_layers: int) -> list[int]:
    """The adapted layers of a model with ``n_layers``."""
    if isinstance(spec, list):
        chosen = spec
    elif spec == "all":
        chosen = list(range(n_layers))
    elif spec == "former":
        chosen = list(range(n_layers // 2))
    elif spec == "latter":
        chosen = list(range(n_layers // 2, n_layers))
    else:
        lo, _, hi = spec.partition("-")
        try:
            chosen = list(range(int(lo), int(hi or lo) + 1))
        except ValueError as exc:
            raise ValueError(f"customize.layers: {spec!r} is not all, former, latter, A-B "
                             "or a list") from exc
    return [i for i in chosen if 0 <= i < n_layers]
