"""The hypernetwork: for each adapted module, a small MLP from the input's z(x) to one weight
per (expert, rank component) (paper code: z -> 64 -> ReLU -> K*r).

The last layer starts at zero, so every logit is 0 and the untrained hypernetwork gives the
uniform weights 1/K: it starts as the uniform merge of the experts (the exact average of
their deltas) and learns from there.
"""

from __future__ import annotations

import torch
from torch import nn

from bdc.customize.config import HypernetConfig


def key(module: str) -> str:
    return module.replace(".", "__")  # ModuleDict keys cannot hold dots


class Hypernetwork(nn.Module):
    def __init__(self, config: HypernetConfig) -> None:
        super().__init__()
        self.config = config
        self.mlps = nn.ModuleDict({
            key(m): nn.Sequential(nn.Linear(config.z_dim, config.hidden), nn.ReLU(),
                                  nn.Linear(config.hidden, config.rank))
            for m in config.modules})
        for mlp in self.mlps.values():
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)

    def weights(self, logits: torch.Tensor) -> torch.Tensor:
        """(batch, K*r) logits -> (batch, K*r) weights, expert-major: entry k*r + j weights
        rank component j of expert k."""
        k, r = len(self.config.experts), self.config.r
        if self.config.normalisation == "expert_softmax":
            return torch.softmax(logits.view(-1, k, r), dim=1).reshape(-1, k * r)
        return torch.softmax(logits, dim=-1) * r  # uniform: r / (K r) = 1 / K

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per adapted module, the (batch, K*r) gate of its rank components."""
        return {m: self.weights(self.mlps[key(m)](z)) for m in self.config.modules}

    def expert_weights(self, z: torch.Tensor) -> torch.Tensor:
        """(batch, K): each expert's mean weight over modules and rank components (1/K each
        for the uniform merge): what the routing diagnostics read."""
        k, r = len(self.config.experts), self.config.r
        gates = torch.stack(list(self.forward(z).values()), 0)  # (modules, batch, K*r)
        return gates.view(gates.shape[0], -1, k, r).mean(dim=(0, 3))
