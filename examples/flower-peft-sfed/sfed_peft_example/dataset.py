"""sfed-peft-example: a small synthetic classification task, split IID over the clients.

A fixed random teacher network labels Gaussian inputs; swap this module for your own data
(``load_partition`` returns one client's share, ``load_eval`` a held-out set).
"""

from __future__ import annotations

import torch


def _task(examples: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000 + seed)
    x = torch.randn(examples, dim, generator=g)
    w1, w2 = torch.randn(dim, dim, generator=g), torch.randn(classes, dim, generator=g)
    return x, (torch.tanh(x @ w1.T) @ w2.T).argmax(1)


def load_partition(partition_id: int, num_partitions: int, examples: int, dim: int, classes: int,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s examples: an IID share of the training set (the first 80%)."""
    x, y = _task(examples, dim, classes, seed)
    n_train = int(0.8 * examples)
    idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed)).chunk(num_partitions)[partition_id]
    return x[idx], y[idx]


def load_eval(examples: int, dim: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out 20% for the server's evaluation."""
    x, y = _task(examples, dim, classes, seed)
    n_train = int(0.8 * examples)
    return x[n_train:], y[n_train:]
