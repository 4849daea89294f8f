"""Aggregation of LoRA adapters whose clients train different ranks (per adapted layer, pure torch).

Client i holds ``B_i: (d, r_i)`` and ``A_i: (r_i, k)`` and trains ``gamma_i * B_i @ A_i``. Every move
of B between a client and the server is function-preserving: ``gamma_to * B_to = gamma_from * B_from``
(:func:`move_b`), so what a client uploads enters the server's model as ``gamma_i B_i A_i`` and what it
downloads is the server's model (on its columns). The three schemes of issue 13:

* zero-padding (HetLoRA): pad to the largest rank ``R``, then average; the server keeps its full A
  (A frozen, clients hold its leading rows) or averages the padded As (A trained);
  a client downloads the leading ``r_i`` columns of B and rows of A (:func:`download_zero_pad`).
* stacking (FLoRA): ``B = [p_1 g_1/g_s B_1 | ... ]``, ``A = [A_1; ...; A_N]``, so that
  ``g_s B @ A = sum_i p_i g_i B_i A_i`` exactly (:func:`stack`); the product is merged into the
  frozen weight and clients restart their adapters.
* SVD redistribution (FlexLoRA): the exact sum (:func:`exact_sum`) and, per client, its best rank-r_i
  approximation split into factors (:func:`svd_redistribute`).

The gammas come from :func:`sfed_theory.client_scaling_factors` (``rescale[i] = server / clients[i]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from validation.adaptive import rescale_for_new_gamma

__all__ = ["normalised_weights", "move_b", "pad_b", "pad_a", "zero_pad_b", "zero_pad_a", "exact_sum", "stack",
           "svd_redistribute", "svd_download", "download_zero_pad"]


def normalised_weights(weights: Sequence[float] | torch.Tensor | None, n: int) -> torch.Tensor:
    """Client weights as a float64 tensor summing to one (equal when ``None``)."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != n:
        raise ValueError(f"weights has {w.numel()} entries but there are {n} clients; give one weight per client")
    if not torch.all(torch.isfinite(w)) or torch.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w / w.sum()


def _check_clients(bs: Sequence[torch.Tensor], gammas: Sequence[float], as_: Sequence[torch.Tensor] | None = None
                   ) -> None:
    if not bs:
        raise ValueError("need at least one client adapter")
    if len(gammas) != len(bs):
        raise ValueError(f"gammas has {len(gammas)} entries but there are {len(bs)} clients")
    if len({b.shape[0] for b in bs}) != 1:
        raise ValueError(f"every client's B must have the same number of rows d, got {[tuple(b.shape) for b in bs]}")
    if as_ is not None:
        if len(as_) != len(bs):
            raise ValueError(f"{len(as_)} A factors for {len(bs)} B factors")
        for b, a in zip(bs, as_):
            if b.shape[1] != a.shape[0]:
                raise ValueError(f"B {tuple(b.shape)} and A {tuple(a.shape)} of a client disagree on its rank")


def move_b(b: torch.Tensor, from_gamma: float, to_gamma: float) -> torch.Tensor:
    """B rescaled so that ``to_gamma * result == from_gamma * b`` (the function is preserved): the
    adaptive rule's :func:`validation.adaptive.rescale_for_new_gamma`, between a client's and the server's gamma."""
    return rescale_for_new_gamma(b, from_gamma, to_gamma)


def pad_b(b: torch.Tensor, width: int) -> torch.Tensor:
    """``(d, r)`` -> ``(d, width)`` with zero columns appended."""
    if width < b.shape[1]:
        raise ValueError(f"cannot pad B of rank {b.shape[1]} to a smaller width {width}")
    return torch.nn.functional.pad(b, (0, width - b.shape[1]))


def pad_a(a: torch.Tensor, height: int) -> torch.Tensor:
    """``(r, k)`` -> ``(height, k)`` with zero rows appended."""
    if height < a.shape[0]:
        raise ValueError(f"cannot pad A of rank {a.shape[0]} to a smaller height {height}")
    return torch.nn.functional.pad(a, (0, 0, 0, height - a.shape[0]))


def zero_pad_b(bs: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor | None,
               gammas: Sequence[float], server_gamma: float) -> torch.Tensor:
    """The server's B ``(d, R)``: the weighted average of the clients' Bs, each moved to the server's
    gamma and zero-padded to the largest rank ``R``."""
    _check_clients(bs, gammas)
    p = normalised_weights(weights, len(bs))
    width = max(b.shape[1] for b in bs)
    return sum(float(pi) * pad_b(move_b(b, g, server_gamma), width) for pi, b, g in zip(p, bs, gammas))


def zero_pad_a(as_: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    """The weighted average of the clients' As zero-padded to ``(R, k)`` (A trained, FedIT-style):
    row l shrinks to ``sum_{r_i >= l} p_i`` of a shared A."""
    if not as_:
        raise ValueError("need at least one client adapter")
    p = normalised_weights(weights, len(as_))
    height = max(a.shape[0] for a in as_)
    return sum(float(pi) * pad_a(a, height) for pi, a in zip(p, as_))


def exact_sum(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor | None,
              gammas: Sequence[float]) -> torch.Tensor:
    """``sum_i p_i gamma_i B_i @ A_i`` ``(d, k)``: the server's update under stacking and SVD."""
    _check_clients(bs, gammas, as_)
    p = normalised_weights(weights, len(bs))
    return sum(float(pi) * g * (b @ a) for pi, b, a, g in zip(p, bs, as_, gammas))


def stack(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor | None,
          gammas: Sequence[float], server_gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked factors ``(d, sum r_i)`` and ``(sum r_i, k)`` with ``server_gamma * B @ A`` the exact sum."""
    _check_clients(bs, gammas, as_)
    p = normalised_weights(weights, len(bs))
    b = torch.cat([float(pi) * move_b(bi, g, server_gamma) for pi, bi, g in zip(p, bs, gammas)], dim=1)
    return b, torch.cat(list(as_), dim=0)


def svd_redistribute(delta: torch.Tensor, rank: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Client factors ``(d, rank)``, ``(rank, k)`` with ``gamma * B @ A`` the best rank-``rank``
    approximation of ``delta`` (truncated SVD; ``A = sqrt(S) V^T``, ``B = U sqrt(S) / gamma``).
    A rank above ``min(d, k)`` is padded with zero columns/rows (the adapter keeps its shape)."""
    if rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    b = u[:, :keep] * root / gamma
    a = root[:, None] * vh[:keep]
    return pad_b(b, rank), pad_a(a, rank)


def svd_download(delta: torch.Tensor, a_init: torch.Tensor, rank: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What a rank-``rank`` client starts from under SVD redistribution: :func:`svd_redistribute` of the
    global change ``delta``, where rows of A with no singular value left (all zero: ``delta`` of lower
    rank, e.g. zero in round 1) take the rows of ``a_init`` (the LoRA init), their B columns staying zero."""
    b, a = svd_redistribute(delta, rank, gamma)
    empty = (a == 0).all(dim=1)
    if empty.any():
        a = torch.where(empty[:, None], a_init[:rank].to(a), a)
    return b, a


def download_zero_pad(b_server: torch.Tensor, a_server: torch.Tensor, rank: int, server_gamma: float,
                      client_gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-``rank`` client's factors from the server's padded ones: the leading columns of B moved to
    the client's gamma and the leading rows of A, so ``client_gamma * B @ A`` equals
    ``server_gamma * b_server[:, :rank] @ a_server[:rank]``."""
    if not 1 <= rank <= b_server.shape[1]:
        raise ValueError(f"rank must lie in 1..{b_server.shape[1]} (the server's width), got {rank}")
    return move_b(b_server[:, :rank], server_gamma, client_gamma), a_server[:rank]
