"""A LoRA linear layer that holds the adapters of many clients and runs them in one pass.

``BatchedLoRALinear`` wraps a frozen ``nn.Linear`` W0 and holds ``A: (G, r, k)`` and
``B: (G, d, r)``. The input batch is client-major (``G * b`` examples, client ``i`` owns rows
``i*b .. (i+1)*b-1``); client ``i``'s rows get ``W0 x + gamma * B_i A_i x``, computed with two
batched matmuls. Summing the per-client losses then gives each client exactly its own gradient,
so all clients' local steps share one forward/backward of the frozen model.
Clients of different gammas (heterogeneous ranks): ``slot_gammas`` ``(G,)`` replaces the one
``gamma`` (``None``, the default, uses ``gamma`` for every slot).
It is numerically the same computation as peft's ``lora.Linear`` (tested).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BatchedLoRALinear", "attach_batched"]


class BatchedLoRALinear(nn.Module):
    """``y_i = W0 x_i + gamma * (x_i A_i^T) B_i^T`` for groups ``i < self.groups``."""

    def __init__(self, base: nn.Linear, n_slots: int, rank: int, gamma: float) -> None:
        super().__init__()
        self.base = base
        d, k = base.out_features, base.in_features
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.A = nn.Parameter(torch.zeros(n_slots, rank, k, **kw))
        self.B = nn.Parameter(torch.zeros(n_slots, d, rank, **kw))
        self.gamma = float(gamma)
        self.slot_gammas: torch.Tensor | None = None  # per-slot gammas (n_slots,), or None: gamma for all
        self.groups = n_slots  # how many slots the next forward uses (set by the caller)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        g = self.groups
        if x.shape[0] % g:
            raise ValueError(f"batch of {x.shape[0]} rows is not a multiple of {g} client groups")
        xs = x.reshape(g, -1, x.shape[-1])  # (G, b*L, k): client-major rows stay together
        z = torch.bmm(torch.bmm(xs, self.A[:g].transpose(1, 2)), self.B[:g].transpose(1, 2))
        if self.slot_gammas is not None:
            return y + (self.slot_gammas[:g, None, None] * z).reshape(y.shape)
        return y + self.gamma * z.reshape(y.shape)


def attach_batched(model: nn.Module, names: tuple[str, ...], n_slots: int, rank: int,
                   gamma: float) -> dict[str, BatchedLoRALinear]:
    """Replace each named ``nn.Linear`` in ``model`` (in place) by a :class:`BatchedLoRALinear`."""
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = BatchedLoRALinear(getattr(parent, child), n_slots, rank, gamma)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers
