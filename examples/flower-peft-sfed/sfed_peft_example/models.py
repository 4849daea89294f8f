"""sfed-peft-example: the frozen base model with peft LoRA adapters, and local training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from sfed_theory.peft import lora_config


class TinyClassifier(nn.Module):
    """A small MLP standing in for your pretrained model (frozen; LoRA on fc1 and fc2)."""

    def __init__(self, dim: int, hidden: int, classes: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.head = nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def get_model(rc: dict, n_clients: int) -> nn.Module:
    """The peft model. SFed: ``lora_config`` instead of ``LoraConfig(r=..., lora_alpha=...)`` makes the
    scaling the rule's gamma (the strategy also sends the round's gamma, which ``load_round`` applies)."""
    base = TinyClassifier(int(rc["data.dim"]), int(rc["model.hidden"]), int(rc["data.classes"]), int(rc["seed"]))
    config = lora_config(int(rc["model.lora.rank"]), n_clients, float(rc["model.lora.alpha"]),
                         target_modules=["fc1", "fc2"], lora_dropout=0.0)
    return get_peft_model(base, config)


def train_locally(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, batch_size: int,
                  train_a: bool = True, seed: int = 0) -> float:
    """A few AdamW steps on the LoRA parameters (FFA: B only); returns the mean training loss."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_B" in name or (train_a and "lora_A" in name))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g, losses = torch.Generator().manual_seed(seed), []
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(y), (min(batch_size, len(y)),), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Loss and accuracy on a data set."""
    model.eval()
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()
