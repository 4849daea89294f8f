"""How the probe's token inputs spread their energy: the input bulk ``nu`` of the refined model.

Every gradient the harness measures is a sum over the probe's tokens, ``dL/dB = gamma sum_t g_t (A x_t)^T``,
so the tokens enter through their second moment ``C = sum_t x_t x_t^T`` (``X^T X``, real tokens only). A
transformer's hidden states share a large mean direction: ``C`` is one spike plus a bulk. The refined
model writes it as ``C = x x^T + nu I`` with ``||x|| = 1`` (:data:`sfed_theory.assumptions.REGIMES`); the spike's
share of the energy, ``lambda_max(C) / tr C``, fixes ``nu``. It is measured on the adapted layers' inputs
at the round's start (B = 0: the base model's own activations, the same at every rank and N), before any
training, like the start gradient that sets ``tau``: an input of the model, not a fitted number.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = ["top_share", "top_direction", "given_or_top_direction", "mean_token_share", "bulk_nu", "probe_nu",
           "coherent_share", "probe_coherent_share", "mean_coherent_share", "mean_coherent_shares", "mean_share_along"]


def top_share(x: torch.Tensor) -> float:
    """``lambda_max(X^T X) / ||X||_F^2`` of token rows ``x`` (n_tokens, k): the share of the tokens' input
    energy along their single strongest direction (1: all tokens on one line; 1/k: isotropic)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected token rows of shape (n_tokens, k), got {tuple(x.shape)}")
    total = float((x * x).sum())
    if total <= 0:
        raise ValueError("the token rows are all zero: no input energy to split")
    return float(torch.linalg.eigvalsh(x.T @ x)[-1]) / total


def top_direction(x: torch.Tensor) -> torch.Tensor:
    """The unit top eigenvector of ``X^T X`` (k,) for token rows ``x`` (n_tokens, k), in float64. The harness,
    which needs it several times per layer and round, takes it once and passes it on as ``top=``."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected token rows of shape (n_tokens, k), got {tuple(x.shape)}")
    return torch.linalg.eigh(x.T @ x)[1][:, -1]


def given_or_top_direction(x: torch.Tensor, top: torch.Tensor | None) -> torch.Tensor:
    """``top`` (the caller's :func:`top_direction` of ``x``, float64) when given, else computed from ``x``."""
    return top_direction(x) if top is None else torch.as_tensor(top, dtype=torch.float64)


def mean_token_share(x: torch.Tensor) -> float:
    """``n ||mean_t x_t||^2 / ||X||_F^2``: the share of the input energy the mean token carries."""
    x = torch.as_tensor(x, dtype=torch.float64)
    return float(x.shape[0] * (x.mean(0) ** 2).sum() / (x * x).sum())


def bulk_nu(share: float, k: int, x_norm2: float = 1.0) -> float:
    """The ``nu`` of ``C = x x^T + nu I_k`` (``||x||^2 = x_norm2``) whose top eigenvalue carries ``share`` of
    ``tr C``: ``(x2 + nu) / (x2 + k nu) = share``, so ``nu = x2 (1 - share) / (k share - 1)``. A share
    of 1 is one probe vector (nu = 0); a share at or below 1/k has no spike to write this way."""
    if not 0.0 < share <= 1.0 or k < 2:
        raise ValueError(f"share must lie in (0, 1] and k >= 2, got share={share}, k={k}")
    if share * k <= 1.0:
        raise ValueError(f"share={share} <= 1/k={1 / k}: the tokens have no spike above an isotropic bulk")
    return x_norm2 * (1.0 - share) / (k * share - 1.0)


def probe_nu(table: pd.DataFrame) -> float:
    """The model's ``nu`` from a table of measured ``top_share`` (one row per seed and layer, with ``k``;
    :func:`paper_figures.probe_input_table.probe_input_table`): from the mean top share over seeds and layers
    (the model treats the layers alike, as it does for every other input)."""
    return bulk_nu(float(np.mean(table.top_share)), int(table.k.iloc[0]))


def coherent_share(increment: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> float:
    """The refined model's ``f_in`` read off one B increment: the share of ``||dB||_F^2`` along the input
    direction ``v = A x_top / ||A x_top||`` (``x_top`` the top direction of the token rows ``x``), above the
    ``1/r`` an increment with no input structure has there: ``(||dB v||^2 / ||dB||^2 - 1/r) / (1 - 1/r)``.
    1 for ``dB = u v^T``; about 0 for iid entries (it can fall below 0 for an increment avoiding ``v``)."""
    db, a = _increment_and_a(increment, a)
    return _share_above_chance(db, a @ top_direction(x))


def probe_coherent_share(increment: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> float:
    """The ``f_in`` at which the refined model's B (a share along ``v = A x_top``, the rest isotropic in r)
    reproduces this increment's alignment with the probe's whole input spectrum ``C = X^T X``: with
    ``M = A C A^T``, the increment's amplification ``a = r tr(dB M dB^T) / (||dB||_F^2 tr M)`` (1 for an
    isotropic increment) against the model's ``f peak + (1 - f)``, ``peak = r v^T M v / tr M`` (a pure
    ``u v^T``), so ``f = (a - 1) / (peak - 1)``. Unlike :func:`coherent_share` it counts an alignment with the
    bulk's directions too, as the adapter output over the probe's tokens does."""
    db, a = _increment_and_a(increment, a)
    x = torch.as_tensor(x, dtype=torch.float64)
    return _probe_share(db, a, a @ (x.T @ x) @ a.T, top_direction(x))


def mean_coherent_share(increments: torch.Tensor, a: torch.Tensor, x: torch.Tensor, *,
                        whole_spectrum: bool = False) -> float:
    """:func:`coherent_share` (``whole_spectrum``: :func:`probe_coherent_share`) averaged over clients:
    ``increments`` (K, d, r) are the clients' B increments, ``a`` their A at the round's start, (K, r, k) or
    one shared (r, k); ``x`` the token rows. NaN at rank 1 (no direction to prefer); a client whose increment
    is zero is left out; NaN if all are. :func:`mean_coherent_shares` gives both at once."""
    return mean_coherent_shares(increments, a, x)[int(whole_spectrum)]


def mean_coherent_shares(increments: torch.Tensor, a: torch.Tensor, x: torch.Tensor, *,
                         top: torch.Tensor | None = None) -> tuple[float, float]:
    """``(along A x_top, over the whole spectrum)``: both client means of :func:`mean_coherent_share` from one
    eigen-decomposition of the tokens' second moment (the harness measures both every round); ``top``: that
    decomposition's :func:`top_direction` of ``x`` when the caller has it."""
    db, a = _clients_increments_and_a(increments, a)
    if a.shape[-2] < 2:
        return float("nan"), float("nan")
    x = torch.as_tensor(x, dtype=torch.float64)
    c = x.T @ x
    top = given_or_top_direction(x, top)
    pairs = [(_share_above_chance(d, ai @ top), _probe_share(d, ai, ai @ c @ ai.T, top))
             for d, ai in zip(db, a) if float(d.pow(2).sum()) > 0]
    if not pairs:
        return float("nan"), float("nan")
    return tuple(float(v) for v in np.mean(pairs, axis=0))  # type: ignore[return-value]


def mean_share_along(increments: torch.Tensor, a: torch.Tensor, direction: torch.Tensor) -> float:
    """The clients' mean share of their B increments (K, d, r) along ``A_i direction`` above the ``1/r`` of an
    unstructured increment (:func:`coherent_share` with a given input direction instead of the tokens' top one);
    ``a``: (K, r, k) or one shared (r, k). NaN at rank 1 or when every increment is zero."""
    db, a = _clients_increments_and_a(increments, a)
    if db.shape[2] < 2:
        return float("nan")
    direction = torch.as_tensor(direction, dtype=torch.float64)
    shares = [_share_above_chance(d, ai @ direction) for d, ai in zip(db, a) if float(d.pow(2).sum()) > 0]
    return float(np.mean(shares)) if shares else float("nan")


def _clients_increments_and_a(increments: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, d, r) increments and their A, one per client (a shared (r, k) A broadcast), in float64; checked."""
    db, a = torch.as_tensor(increments, dtype=torch.float64), torch.as_tensor(a, dtype=torch.float64)
    if db.ndim != 3 or a.ndim not in (2, 3) or db.shape[2] != a.shape[-2]:
        raise ValueError(f"need increments (K, d, r) and A (K, r, k) or (r, k), got {tuple(db.shape)} and {tuple(a.shape)}")
    return db, (a.expand(db.shape[0], -1, -1) if a.ndim == 2 else a)


def _increment_and_a(increment: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    db, a = torch.as_tensor(increment, dtype=torch.float64), torch.as_tensor(a, dtype=torch.float64)
    r = a.shape[0]
    if db.ndim != 2 or db.shape[1] != r or r < 2:
        raise ValueError(f"need dB (d, r) and A (r, k) with r >= 2, got {tuple(db.shape)} and {tuple(a.shape)}")
    return db, a


def _share_above_chance(db: torch.Tensor, v: torch.Tensor) -> float:
    r = db.shape[1]
    share = float((db @ (v / v.norm())).pow(2).sum() / db.pow(2).sum())
    return (share - 1.0 / r) / (1.0 - 1.0 / r)


def _probe_share(db: torch.Tensor, a: torch.Tensor, m: torch.Tensor, top: torch.Tensor) -> float:
    r, tr = db.shape[1], float(torch.trace(m))
    amplification = r * float(torch.trace(db @ m @ db.T)) / (float(db.pow(2).sum()) * tr)
    v = a @ top
    peak = r * float(v @ m @ v) / (float(v @ v) * tr)
    return (amplification - 1.0) / (peak - 1.0) if abs(peak - 1.0) > 1e-12 else float("nan")  # no spike through A
