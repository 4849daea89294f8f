"""Scaling rules: the factor ``gamma`` in ``dW = gamma * B @ A``.

Every rule is a pure function of plain numbers. The general rule is the solution of the
invariance condition derived in :mod:`sfed_theory.derivation`; it reduces to the paper's
``alpha * sqrt(N / r)`` at ``rho = 0`` with equal weights, and to rsLoRA's ``alpha / sqrt(r)`` at
``N = 1`` or ``rho = 1``. The tests check both reductions and check the rule against the
symbolic solution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import numpy as np

__all__ = ["RULES", "scaling_factor", "effective_clients", "weights_sum_squares"]

RULES: tuple[str, ...] = ("lora", "rslora", "sfed", "sfed-general")


def _check_finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_count(name: str, value: float, what: str) -> int:
    value_f = _check_finite(name, value)
    if value_f != int(value_f) or value_f < 1:
        raise ValueError(f"{name} must be an integer >= 1 ({what}), got {value!r}")
    return int(value_f)


def weights_sum_squares(weights: Sequence[float] | np.ndarray, n_clients: int | None = None) -> float:
    """Return ``sum_i p_i^2`` for client weights normalised to sum to one.

    ``weights`` may be unnormalised (e.g. client data sizes); they must be finite, non-negative
    and not all zero. If ``n_clients`` is given, the number of weights must equal it.
    """
    w = np.asarray(weights, dtype=float).ravel()
    if w.size == 0:
        raise ValueError("weights must contain at least one client weight, got an empty sequence")
    if n_clients is not None and w.size != n_clients:
        raise ValueError(f"weights has {w.size} entries but n_clients={n_clients}; give one weight per client")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite (no NaN or inf)")
    if np.any(w < 0):
        raise ValueError("weights must be non-negative (client data sizes or probabilities)")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights must not be all zero: at least one client needs positive weight")
    p = w / total
    return float(np.sum(p * p))


def effective_clients(
    n_clients: int,
    rho: float = 0.0,
    weights: Sequence[float] | np.ndarray | None = None,
    participating: int | None = None,
) -> float:
    """Effective client count ``N_eff = 1 / (rho + (1 - rho) * S2)``.

    ``S2`` is the sum of squared normalised weights of the clients that are averaged in one round:
    ``1/N`` for equal weights, ``1/K`` when K of N clients are sampled uniformly and averaged with
    equal weights. With unequal weights and sampling, the sampled weights are renormalised and
    ``E[S2]`` is approximated by the ratio of expectations ``N * S2 / K`` (exact for equal weights).

    ``rho`` may be negative (anti-correlated clients, e.g. under strong label skew with few clients):
    an exchangeable correlation can go down to ``-S2 / (1 - S2)`` (``-1/(K-1)`` for K equal weights),
    where the averaged variance ``rho + (1 - rho) S2`` reaches 0; then ``N_eff > K``. Values at or
    below that bound, or above 1, raise ValueError.
    """
    n = _check_count("n_clients", n_clients, "number of clients")
    rho = _check_finite("rho", rho)
    k = n
    if participating is not None:
        k = _check_count("participating", participating, "clients sampled per round")
        if k > n:
            raise ValueError(f"participating={k} exceeds n_clients={n}: at most N of N clients can take part")
    if weights is None:
        s2 = 1.0 / k
    else:
        s2 = weights_sum_squares(weights, n)
        if k < n:
            s2 = min(1.0, n * s2 / k)
    c_n = rho + (1.0 - rho) * s2
    if rho > 1.0 or not c_n > 0.0:
        low = -s2 / (1.0 - s2) if s2 < 1.0 else 0.0
        raise ValueError(f"rho (client correlation) must lie in ({low:.6g}, 1] for these clients "
                         f"(S2 = sum p_i^2 = {s2:.6g}; below -S2/(1-S2) the averaged variance is not positive), "
                         f"got {rho}")
    return 1.0 / c_n


def _lora(alpha: float, rank: int, n_clients: int) -> float:
    return alpha / rank


def _rslora(alpha: float, rank: int, n_clients: int) -> float:
    return alpha / math.sqrt(rank)


def _sfed(alpha: float, rank: int, n_clients: int) -> float:
    return alpha * math.sqrt(n_clients / rank)


_SIMPLE: dict[str, Callable[[float, int, int], float]] = {"lora": _lora, "rslora": _rslora, "sfed": _sfed}


def scaling_factor(rule: str, alpha: float, rank: int, n_clients: int = 1, **kw: object) -> float:
    """Scaling factor ``gamma`` of a LoRA adapter ``dW = gamma * B @ A``.

    Parameters
    ----------
    rule:
        ``"lora"`` (``alpha / r``), ``"rslora"`` (``alpha / sqrt(r)``), ``"sfed"``
        (``alpha * sqrt(N / r)``) or ``"sfed-general"``
        (``alpha / sqrt(r * (rho + (1 - rho) * S2))`` = ``alpha * sqrt(N_eff / r)``).
    alpha:
        The LoRA alpha (finite, > 0).
    rank:
        Adapter rank r (integer >= 1).
    n_clients:
        Number of federated clients N (integer >= 1).
    **kw:
        Only for ``"sfed-general"``: ``rho`` (client correlation in [0, 1], default 0), ``weights``
        (one non-negative weight per client, normalised internally; default equal), and
        ``participating`` (K of N clients sampled per round; default N).

    Raises
    ------
    ValueError
        On an unknown rule, a non-finite or out-of-range argument, or keyword arguments that the
        rule does not take; the message says what was wrong and what is allowed.

    Examples
    --------
    >>> round(scaling_factor("sfed", alpha=16, rank=256, n_clients=16), 6)
    4.0
    """
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; allowed rules: {', '.join(RULES)}")
    alpha = _check_finite("alpha", alpha)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    r = _check_count("rank", rank, "adapter rank")
    n = _check_count("n_clients", n_clients, "number of clients")
    if rule in _SIMPLE:
        if kw:
            raise ValueError(
                f"rule {rule!r} takes no extra arguments, got {sorted(kw)}; "
                "rho, weights and participating belong to 'sfed-general'"
            )
        return _SIMPLE[rule](alpha, r, n)
    allowed = {"rho", "weights", "participating"}
    unknown = set(kw) - allowed
    if unknown:
        raise ValueError(f"'sfed-general' got unknown arguments {sorted(unknown)}; allowed: {sorted(allowed)}")
    rho = _check_finite("rho", kw.get("rho", 0.0))  # type: ignore[arg-type]
    if not 0.0 <= rho <= 1.0:
        # the rule's *assumed* correlation; a measured negative rho goes through effective_clients
        raise ValueError(f"rho (client correlation) assumed by 'sfed-general' must lie in [0, 1], got {rho}")
    n_eff = effective_clients(
        n,
        rho=rho,  # type: ignore[arg-type]
        weights=kw.get("weights"),  # type: ignore[arg-type]
        participating=kw.get("participating"),  # type: ignore[arg-type]
    )
    return alpha * math.sqrt(n_eff / r)
