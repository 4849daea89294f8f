"""How far the end-of-round gradient can drop between two SFed cells if it is affine in the update.

The canonical and refined random models (``adam``, ``adam-refined``) share three features: the
clients' increments do not depend on gamma (Adam's step size does not follow the forward scale), the
probe's gradient after the round is an affine function of the round's update, ``G_end = G_0 + H[dW]``
for a fixed linear map H (any curvature, isotropic or not; the refined model's ``lambda`` is one
choice), and the update is ``dW = gamma (D + n) A``: the clients' mean increment D, the same at every
N, plus the average n of their noise, whose second moment shrinks like ``1/N_eff``. Project on A^T (the
gradient w.r.t. B of FFA, where A is frozen) and divide by the start value; then for every such model

    R(gamma, K) = E||G_end A^T||^2 / E||G_0 A^T||^2 = 1 + 2 gamma p + gamma^2 q + gamma^2 m / N_eff(K),

with ``q >= p^2`` (Cauchy-Schwarz: p is the mean of an inner product, q the mean square of its second
factor) and ``m >= 0``. SFed scales gamma by c when K grows by c^2 (N_eff grows at most by c^2 when the
clients' correlation is >= 0), so the noise term cannot fall, and the drop ``R(gamma, K) -
R(c gamma, c^2 K)`` has a largest value over the whole class. :func:`derive_drop_bound` derives it;
:func:`drop_bound` evaluates it. A measured drop above the bound rules out every model of the class,
whatever its parameters.

A second consequence needs neither SFed nor Cauchy-Schwarz. At a gamma that does not depend on K (LoRA,
rsLoRA) everything but the noise term is the same in every cell, and the noise term is ``m c_K`` with
``c_K = rho + (1 - rho)/K`` (exchangeable clients; a label-skew share s only changes rho and the 1/K
coefficient), affine in 1/K. So ``R(K1) - R(K2) = w (R(K2) - R(K3))`` with a weight w that
:func:`noise_difference_ratio` derives: 4 for K = 1, 4, 16, whatever rho, m and the curvature.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

__all__ = ["DropBound", "derive_drop_bound", "drop_bound", "end_gradient_ratio", "noise_difference_ratio"]

t, c, e, nu, nu2, gamma, p, q, m, n1, n2 = sp.symbols("t c e nu nu' gamma p q m N_eff N_eff'", real=True)


def end_gradient_ratio(g: sp.Expr = gamma, n_eff: sp.Expr = n1) -> sp.Expr:
    """``R(gamma, K)`` of the affine class, in the symbols p, q, m (module docstring)."""
    return 1 + 2 * g * p + g**2 * q + g**2 * m / n_eff


@dataclass(frozen=True)
class DropBound:
    """The derivation's steps: the drop, the drop at the worst admissible q and noise, and its maximum."""

    drop: sp.Expr  # R(gamma, K) - R(c gamma, c^2 K) in p, q, m
    reduced: sp.Expr  # with q = p^2 and equal noise terms, in t = gamma p
    argmax: sp.Expr  # the t that maximises it
    bound: sp.Expr  # the largest drop, a function of c


@lru_cache(maxsize=1)
def derive_drop_bound() -> DropBound:
    """Derive the largest drop of R between an SFed cell and the one with c^2 times the clients.

    The drop is ``2 gamma p (1 - c) + gamma^2 q (1 - c^2) + gamma^2 m (1/N_eff - c^2/N_eff')``. For c > 1
    the q-term is largest at the smallest admissible q, ``p^2``, and the noise term is <= 0 when
    ``N_eff' <= c^2 N_eff``, so the supremum is that of the reduced drop over t = gamma p."""
    drop = sp.expand(end_gradient_ratio(gamma, n1) - end_gradient_ratio(c * gamma, n2))
    kappa = sp.Symbol("kappa", positive=True)  # N_eff' = kappa c^2 N_eff, kappa <= 1
    noise = sp.simplify(drop.coeff(m).subs(n2, kappa * c**2 * n1) * kappa * n1 / gamma**2)
    if sp.simplify(noise - (kappa - 1)) != 0:
        raise RuntimeError(f"unexpected noise coefficient {noise}")  # (kappa - 1) <= 0: noise never adds
    if sp.simplify(drop.coeff(q) - gamma**2 * (1 - c**2)) != 0:
        raise RuntimeError("unexpected q coefficient")  # < 0 for c > 1: the smallest q, p^2, is the worst
    worst = drop.subs(q, p**2).subs(m, 0)
    reduced = sp.expand(worst.subs(p, t / gamma))
    stationary = sp.solve(sp.diff(reduced, t), t)
    if len(stationary) != 1:
        raise RuntimeError(f"expected one stationary point, got {stationary}")
    t_star = sp.simplify(stationary[0])
    if not sp.simplify(sp.diff(reduced, t, 2).subs(c, 2)).is_negative:
        raise RuntimeError("the reduced drop should be concave in t for c > 1")
    return DropBound(drop, reduced, t_star, sp.factor(sp.simplify(reduced.subs(t, t_star))))


@lru_cache(maxsize=64)
def drop_bound(gamma_ratio: float) -> float:
    """The largest ``R(gamma, K) - R(c gamma, c^2 K)`` any model of the affine class allows; ``c`` =
    ``gamma_ratio`` > 1 (SFed from K to 4K: c = 2, bound 1/3)."""
    if not gamma_ratio > 1:
        raise ValueError(f"the bound needs gamma to grow between the cells (ratio > 1), got {gamma_ratio}")
    return float(derive_drop_bound().bound.subs(c, gamma_ratio))


@lru_cache(maxsize=64)
def noise_difference_ratio(k1: int, k2: int, k3: int) -> float:
    """``(c_K1 - c_K2) / (c_K2 - c_K3)`` with ``c_K = rho + (1 - rho)/K``: the ratio of consecutive drops of
    R at a fixed gamma that every affine end-gradient model gives (rho cancels; derived, not assumed)."""
    if not 0 < k1 < k2 < k3:
        raise ValueError(f"need 0 < K1 < K2 < K3, got {k1, k2, k3}")
    rho = sp.Symbol("rho")
    c_k = lambda k: rho + (1 - rho) / k  # noqa: E731
    ratio = sp.simplify((c_k(k1) - c_k(k2)) / (c_k(k2) - c_k(k3)))
    if ratio.free_symbols:
        raise RuntimeError(f"the ratio should not depend on rho: {ratio}")
    return float(ratio)
