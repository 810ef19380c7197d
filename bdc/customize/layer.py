"""A linear layer with the experts' frozen LoRA factors stacked into one rank-K*r LoRA whose
rank components are gated per input:

    y = W x + B diag(s * g(x)) A x,   A = [A_1; ...; A_K],  B = [B_1 ... B_K],  s = alpha / r

which is ``dW(x) = (alpha / r) sum_k B_k diag(w_k(x)) A_k`` with the LoRA scaling kept (the
authors' code dropped it), batched over inputs and never materialising a per-input dW: two
matrix products of rank K*r, like a single LoRA of that rank.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scaling: float) -> None:
        super().__init__()
        self.base_layer = base
        self.register_buffer("lora_A", lora_a.detach().clone(), persistent=False)  # (Kr, in)
        self.register_buffer("lora_B", lora_b.detach().clone(), persistent=False)  # (out, Kr)
        self.scaling = scaling
        self.gate: torch.Tensor | None = None  # (batch, Kr), set around each forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.gate is None:
            raise RuntimeError("a gated layer ran without its gate (use CustomizedModel)")
        h = (x.to(self.lora_A.dtype) @ self.lora_A.T) * (self.scaling * self.gate)[:, None, :]
        return result + (h @ self.lora_B.T).to(result.dtype)
