"""The customized solver: the frozen base with gated layers over the frozen experts, and the
hypernetwork that gates them from the input.

``z(x) = [embedding(x) ; cos(x, centroid_k) for each k]``, with the embedder and centroids of
the disentangle stage. Only the hypernetwork trains: ``state_dict`` holds its weights alone
(a checkpoint of an 8B solver is the router's few MB, not the base).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bdc.customize.config import HypernetConfig, layer_indices
from bdc.customize.layer import GatedLoraLinear
from bdc.customize.router import Hypernetwork

WEIGHTS_NAME = "hypernet.safetensors"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def inputs(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """z(x) from unit embeddings: the embedding and its cosine to every centroid."""
    return np.concatenate([vectors, vectors @ centroids.T], axis=1).astype(np.float32)


class CustomizedModel(nn.Module):
    def __init__(self, model: nn.Module, router: Hypernetwork) -> None:
        super().__init__()
        self.model, self.router = model, router
        self.config: HypernetConfig = router.config

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_experts(cls, peft, names: list[str], layers: str | list[int],
                     projections: list[str] | None, z_dim: int, hidden: int,
                     normalisation: str) -> CustomizedModel:
        """Replace every LoRA layer of ``peft`` (the experts loaded as named adapters): in an
        adapted layer and projection by a gated rank-K*r layer over the experts' A and B, and
        elsewhere by its base layer (the base model alone)."""
        from peft.tuners.lora import LoraLayer

        hf = peft.base_model.model
        n_layers = hf.config.num_hidden_layers
        chosen = set(layer_indices(layers, n_layers))
        lora = [(name, m) for name, m in hf.named_modules() if isinstance(m, LoraLayer)]
        if not lora:
            raise ValueError("the experts adapt no module")
        ranks = {m.r[n] for _, m in lora for n in names}
        scalings = {m.scaling[n] for _, m in lora for n in names}
        if len(ranks) != 1 or len(scalings) != 1:
            raise ValueError("the experts must share one rank and scaling")
        adapted = []
        for name, module in lora:
            match = _LAYER.search(f".{name}")
            projection = name.rsplit(".", 1)[-1]
            keep = match is not None and int(match.group(1)) in chosen and \
                (projections is None or projection in projections)
            parent_name, child = name.rsplit(".", 1)
            if keep:
                new = GatedLoraLinear(
                    module.base_layer,
                    torch.cat([module.lora_A[n].weight for n in names], 0),
                    torch.cat([module.lora_B[n].weight for n in names], 1),
                    scalings.copy().pop())
                adapted.append(name)
            else:
                new = module.base_layer
            setattr(hf.get_submodule(parent_name), child, new)
        if not adapted:
            raise ValueError(f"customize.layers {layers!r} / projections {projections}: no "
                             f"module of the {n_layers} layers is adapted")
        for p in hf.parameters():
            p.requires_grad_(False)
        config = HypernetConfig(experts=list(names), r=ranks.pop(), scaling=scalings.pop(),
                                modules=adapted, z_dim=z_dim, hidden=hidden,
                                normalisation=normalisation)
        router = Hypernetwork(config).to(next(hf.parameters()).device)
        return cls(hf, router)

    # ------------------------------------------------------------------ running

    @contextlib.contextmanager
    def gated(self, z: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
        gates = self.router(z.to(next(self.router.parameters()).device))
        layers = {name: self.model.get_submodule(name) for name in self.config.modules}
        try:
            for name, layer in layers.items():
                layer.gate = gates[name]
            yield gates
        finally:
            for layer in layers.values():
                layer.gate = None

    def forward(self, input_ids, attention_mask=None, labels=None, z=None, **kwargs):
        """The base model's forward (labels shifted inside it: token t predicts t + 1)."""
        with self.gated(z):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              labels=labels, **kwargs)

    def generate(self, z: torch.Tensor, **kwargs):
        with self.gated(z):
            return self.model.generate(**kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ weights

    def state_dict(self, *args, **kwargs):  # only what trains: the router
        return {f"router.{k}": v for k, v in self.router.state_dict().items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        mine = {k.removeprefix("router."): v for k, v in state_dict.items()
                if k.startswith("router.")}
        return self.router.load_state_dict(mine, strict=strict)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.router.state_dict().items()},
                  folder / WEIGHTS_NAME)
        self.config.save(folder)

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        self.router.load_state_dict(load_file(folder / WEIGHTS_NAME))
