"""Scaling factors when federated clients train different LoRA ranks.

``client_scaling_factors(rule, alpha, ranks, ...)`` returns the server's gamma, each client's gamma
and the per-client factor by which B is rescaled when it moves between server and client, so that
``gamma_client * B_client = gamma_server * B_server`` (on the client's columns): the model a client
downloads is the model the server holds, and what a client uploads enters the server's model as
``gamma_i B_i A_i`` whatever the two gammas are.

The derived rules come from :mod:`sfed_theory.hetero` (Adam-like increments, the canonical model):
under function-preserving moves the server's aggregate is ``sum_i p_i gamma_i B_i A_i`` and

    E||dW x||^2 = K * H(gamma),   K = d s_A^2 s_B^2 ||x||^2,
    H(gamma) = rho * sum_l (sum_{i: r_i >= l} p_i gamma_i)^2 + (1 - rho) * sum_i p_i^2 gamma_i^2 r_i

(shared, nested A: zero-padding with A frozen, stacking, SVD redistribution's aggregate);
``sum_l P_l^2 [rho (sum_{r_i >= l} p_i gamma_i)^2 + (1 - rho) sum_{r_i >= l} p_i^2 gamma_i^2]`` with
``P_l = sum_{r_i >= l} p_i`` when zero-padding also averages a trained A (its in-round change small
against its init); ``sum_i p_i^2 gamma_i^2 r_i`` when every client draws its own A init. The
invariance condition ``H(gamma) = alpha^2`` (the size of one rank-1 client at gamma = alpha) fixes one
common factor; the rules differ in the per-client profile:

* ``"sfed-hetero"``: ``gamma_i = c / sqrt(r_i)``, the profile that keeps each client's own local
  model rank-stable (the one-client condition, rsLoRA per client), and ``c = alpha / sqrt(H(1/sqrt r))``.
  At rho = 0 this is ``alpha * sqrt(N_eff / r_i)``: every client uses the homogeneous rule at its rank.
* ``"sfed-hetero-shared"``: one gamma for everyone, ``alpha / sqrt(H(1))``; at rho = 0 and A frozen,
  ``alpha / sqrt(sum_i p_i^2 r_i)``.

The formulas here are plain numbers; ``tests/test_hetero_ranks.py`` checks them against the
symbolic derivation (``solve_hetero``) on random rank mixes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sfed_theory.rules import effective_clients

__all__ = ["HETERO_RULES", "HETERO_SCHEMES", "ClientScaling", "client_scaling_factors", "aggregate_moment",
           "mix_ranks", "size_exponent"]

HETERO_RULES: tuple[str, ...] = ("lora", "rslora", "sfed", "sfed-general", "sfed-hetero", "sfed-hetero-shared")
HETERO_SCHEMES: tuple[str, ...] = ("zero-pad", "stack", "svd")


@dataclass(frozen=True)
class ClientScaling:
    """Gammas for one federation of heterogeneous ranks.

    ``rescale[i] = server / clients[i]``: multiply the server's B (its leading ``r_i`` columns) by
    ``rescale[i]`` when client i downloads it, divide client i's B by it when uploading.
    ``size`` is the predicted ``sqrt(E||dW x||^2)`` of the server's aggregate relative to one rank-1
    client at ``gamma = alpha`` (1 for the derived rules; below 1 means the aggregate collapses).
    """

    rule: str
    alpha: float
    ranks: tuple[int, ...]
    scheme: str
    weights: tuple[float, ...]  # normalised to sum to one
    rho: float
    server: float
    clients: tuple[float, ...]
    rescale: tuple[float, ...]
    size: float


def _check_ranks(ranks: Sequence[int]) -> tuple[int, ...]:
    try:
        items = list(ranks)
    except TypeError:
        raise ValueError(f"ranks must be a sequence of client ranks (integers >= 1), got {ranks!r}") from None
    if not items:
        raise ValueError("ranks must list at least one client rank (an integer >= 1), got an empty sequence")
    out = []
    for r in items:
        ok = isinstance(r, (int, np.integer)) and not isinstance(r, bool) or (isinstance(r, float) and r.is_integer())
        if not ok or r < 1:
            raise ValueError(f"every rank must be an integer >= 1, got {r!r} in {items}")
        out.append(int(r))
    return tuple(out)


def _check_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=float).ravel()
    if w.size != n:
        raise ValueError(f"weights has {w.size} entries but ranks has {n}; give one weight per client")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero (client data sizes or probabilities)")
    return w / w.sum()


def aggregate_moment(ranks: Sequence[int], gammas: Sequence[float], weights: Sequence[float] | None = None,
                     rho: float = 0.0, *, train_a: bool = False, a_init: str = "shared",
                     scheme: str = "zero-pad") -> float:
    """``H(gamma) = E||dW x||^2 / (d s_A^2 s_B^2 ||x||^2)`` of the server's aggregate (Adam model)."""
    r = np.asarray(_check_ranks(ranks))
    p = _check_weights(weights, r.size)
    g = np.asarray(gammas, dtype=float)
    if g.size != r.size:
        raise ValueError(f"gammas has {g.size} entries but ranks has {r.size}; give one gamma per client")
    if a_init == "independent":
        return float(np.sum(p**2 * g**2 * r))
    levels = np.arange(1, int(r.max()) + 1)
    holds = r[None, :] >= levels[:, None]  # (R, N): client i holds column l
    shared = holds @ (p * g)  # sum_{r_i >= l} p_i gamma_i
    own = holds @ (p**2 * g**2)  # sum_{r_i >= l} p_i^2 gamma_i^2
    per_column = rho * shared**2 + (1.0 - rho) * own
    if train_a and scheme == "zero-pad":  # padded A rows shrink by P_l
        per_column = (holds @ p) ** 2 * per_column
    return float(np.sum(per_column))


def _profile(rule: str, alpha: float, ranks: tuple[int, ...], p: np.ndarray, rho: float) -> tuple[np.ndarray, float]:
    """Per-client gammas up to the common factor, and the server's (same profile at the largest rank)."""
    r = np.asarray(ranks, dtype=float)
    big = float(r.max())
    if rule == "lora":
        return alpha / r, alpha / big
    if rule == "rslora":
        return alpha / np.sqrt(r), alpha / math.sqrt(big)
    if rule in ("sfed", "sfed-general"):
        n_eff = len(ranks) if rule == "sfed" else effective_clients(len(ranks), rho=rho, weights=p)
        return alpha * np.sqrt(n_eff / r), alpha * math.sqrt(n_eff / big)
    if rule == "sfed-hetero":
        return 1.0 / np.sqrt(r), 1.0 / math.sqrt(big)
    return np.ones_like(r), 1.0  # sfed-hetero-shared


def client_scaling_factors(rule: str, alpha: float, ranks: Sequence[int], *, scheme: str = "zero-pad",
                           weights: Sequence[float] | None = None, rho: float = 0.0, train_a: bool = False,
                           a_init: str = "shared") -> ClientScaling:
    """Server and per-client gammas, the function-preserving rescale of B, and the predicted size.

    Parameters
    ----------
    rule:
        ``"lora"`` (``alpha / r``), ``"rslora"`` (``alpha / sqrt(r)``), ``"sfed"`` (``alpha * sqrt(N / r)``),
        ``"sfed-general"`` (``alpha * sqrt(N_eff / r)``): each at the client's own rank and, for the
        server, at the largest rank. ``"sfed-hetero"`` and ``"sfed-hetero-shared"``: derived (module
        docstring).
    alpha:
        The LoRA alpha (finite, > 0).
    ranks:
        One rank per client (integers >= 1); N = len(ranks) clients are averaged.
    scheme:
        ``"zero-pad"`` (HetLoRA), ``"stack"`` (FLoRA), ``"svd"`` (FlexLoRA).
    weights:
        One non-negative aggregation weight per client (normalised here); default equal.
    rho:
        Client correlation in [0, 1] assumed by the derived rules and the predicted size.
    train_a:
        A is trained and aggregated too (FedIT-style); under zero-padding its padded rows shrink.
    a_init:
        ``"shared"`` (one broadcast A, clients hold its leading rows) or ``"independent"`` (every client
        draws its own A: stacking and SVD only).

    Raises
    ------
    ValueError
        On an unknown rule or scheme, empty ranks, a rank < 1, weights of the wrong length, or an
        out-of-range number; the message says what is allowed.

    Examples
    --------
    >>> s = client_scaling_factors("sfed", 16, [64, 64, 64, 64])
    >>> round(s.server, 6), [round(g, 6) for g in s.clients]
    (4.0, [4.0, 4.0, 4.0, 4.0])
    """
    if not isinstance(rule, str) or rule not in HETERO_RULES:
        raise ValueError(f"unknown rule {rule!r}; allowed rules: {', '.join(HETERO_RULES)}")
    if not isinstance(scheme, str) or scheme not in HETERO_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; allowed schemes: {', '.join(HETERO_SCHEMES)}")
    if a_init not in ("shared", "independent"):
        raise ValueError(f"unknown a_init {a_init!r}; allowed: shared, independent")
    if scheme == "zero-pad" and a_init != "shared":
        raise ValueError("zero-padding averages factors position by position and needs one shared A "
                         "(a_init='shared'); independent A inits are for 'stack' and 'svd'")
    try:
        alpha, rho = float(alpha), float(rho)
    except (TypeError, ValueError):
        raise ValueError(f"alpha and rho must be real numbers, got alpha={alpha!r}, rho={rho!r}") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho (client correlation) must lie in [0, 1], got {rho}")
    r = _check_ranks(ranks)
    p = _check_weights(weights, len(r))
    clients, server = _profile(rule, alpha, r, p, rho)
    moment = dict(weights=p, rho=rho, train_a=train_a, a_init=a_init, scheme=scheme)
    if rule in ("sfed-hetero", "sfed-hetero-shared"):
        c = alpha / math.sqrt(aggregate_moment(r, clients, **moment))
        clients, server = c * clients, c * server
    size = math.sqrt(aggregate_moment(r, clients, **moment)) / alpha
    return ClientScaling(rule, alpha, r, scheme, tuple(float(v) for v in p), rho, float(server),
                         tuple(float(g) for g in clients), tuple(float(server / g) for g in clients), size)


def mix_ranks(mix: Sequence[int], n_clients: int) -> tuple[int, ...]:
    """``n_clients`` ranks cycling through ``mix``: a fixed rank mix at any N (``(4, 16, 64)``, 5 ->
    ``(4, 16, 64, 4, 16)``); the N axis of a heterogeneous grid."""
    m = _check_ranks(mix)
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"n_clients must be an integer >= 1, got {n_clients!r}")
    return tuple(m[i % len(m)] for i in range(int(n_clients)))


def size_exponent(rule: str, alpha: float, mix: Sequence[int], n_clients: Sequence[int], **kw: object) -> float:
    """Least-squares slope of ``log size`` against ``log N`` for a rank mix cycled to each N: the
    predicted exponent in N of the aggregate's norm under ``rule`` (0 for the derived rules)."""
    ns = sorted({int(n) for n in n_clients})
    if len(ns) < 2:
        raise ValueError(f"n_clients must hold at least two distinct client counts, got {list(n_clients)}")
    sizes = [client_scaling_factors(rule, alpha, mix_ranks(mix, n), **kw).size for n in ns]  # type: ignore[arg-type]
    return float(np.polyfit(np.log(ns), np.log(sizes), 1)[0])
