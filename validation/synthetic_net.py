"""The synthetic teacher-student task's network: seeded weights and the frozen student MLP.

Shared by :mod:`validation.data` (the teacher labels the synthetic inputs with these weights plus
a low-rank perturbation) and :mod:`validation.models` (the student is the same network, frozen,
with LoRA on fc1/fc2). Kept apart from both so neither imports the other.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["synthetic_weights", "SyntheticNet"]


def synthetic_weights(dim: int, n_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded float64 weights of the synthetic student MLP (fc1, fc2: dim x dim; head: C x dim)."""
    g = torch.Generator().manual_seed(20_000 + seed)
    return {
        "fc1": torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim) * 1.5,
        "fc2": torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim) * 1.5,
        "head": torch.randn(n_classes, dim, generator=g, dtype=torch.float64) / math.sqrt(dim) * 3.0,
    }


class SyntheticNet(nn.Module):
    """``logits = head(tanh(fc2(tanh(fc1(x)))))`` with all weights frozen; LoRA targets fc1, fc2."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        dim, n_classes = weights["fc1"].shape[1], weights["head"].shape[0]
        self.fc1 = nn.Linear(dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, n_classes, bias=False)
        with torch.no_grad():
            for name in ("fc1", "fc2", "head"):
                getattr(self, name).weight.copy_(weights[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
