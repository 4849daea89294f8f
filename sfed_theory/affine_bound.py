"""How far the end-of-round gradient can drop between two SFed cells if it is affine in the update.

The canonical and refined random models (``adam``, ``adam-refined``) share these features: the
clients' increments do not depend on gamma (Adam's step size does not follow the forward scale); the
probe's gradient after the round is an affine function of the round's update, ``G_end = G_0 + H[dW]``
for a fixed linear map H (any curvature, isotropic or not; the refined model's ``lambda`` is one
choice); and the update is ``dW = gamma (D + n) A``, with D the clients' mean increment, the same at
every N, and n the average of their noise, which has zero mean given (G_0, D, A, H) and a second moment
proportional to ``c_N = rho + (1 - rho)/N`` (equal weights). Project on A^T (the gradient w.r.t. B of
FFA, where A is frozen) and divide by the start value; then for every such model

    R(gamma, N) = E||G_end A^T||^2 / E||G_0 A^T||^2 = 1 + 2 gamma p + gamma^2 q + gamma^2 m c_N,

with ``q >= p^2`` (Cauchy-Schwarz: p is the mean of an inner product, q the mean square of its second
factor) and ``m >= 0``. SFed scales gamma by c when N grows by c^2. If ``N_eff' <= c^2 N_eff`` (true for
rho >= 0; under a zero-sum label-skew share, ``c_N = rho + (1 - rho - s)/N``, for a base rho >= 0), the
noise term cannot fall, and the drop ``R(gamma, N) - R(c gamma, c^2 N)`` has a largest value over the
whole class: :func:`derive_drop_bound` reduces the drop by these two arguments (stated, not derived)
and lets sympy maximise what is left; :func:`drop_bound` evaluates it. A measured drop above the bound
rules out the conjunction of these assumptions, whatever the parameters.

A second consequence needs neither SFed nor Cauchy-Schwarz. At a gamma that does not depend on N (LoRA,
rsLoRA) everything but the noise term is the same in every cell, and if the noise's second moment is
``a + b/N`` (the clients' mean variance and mean pairwise covariance do not depend on N; equal weights),
``R(N1) - R(N2) = w (R(N2) - R(N3))`` with a weight w that :func:`noise_difference_ratio` derives: 4 for
N = 1, 4, 16, whatever rho, m and the curvature.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

__all__ = ["DropBound", "derive_drop_bound", "drop_bound", "end_gradient_ratio", "noise_difference_ratio"]

t, gamma, p, q, m = sp.symbols("t gamma p q m", real=True)
delta, kappa, neff, neff2 = sp.symbols("delta kappa N_eff N_eff'", positive=True)
c = 1 + delta  # the gamma ratio between the two cells, > 1


def end_gradient_ratio(g: sp.Expr = gamma, n_eff: sp.Expr = neff) -> sp.Expr:
    """``R(gamma, N)`` of the affine class, in the symbols p, q, m (module docstring)."""
    return 1 + 2 * g * p + g**2 * q + g**2 * m / n_eff


@dataclass(frozen=True)
class DropBound:
    """The steps: the drop, its noise coefficient, the reduced drop, its maximiser and maximum (in c)."""

    drop: sp.Expr  # R(gamma, N) - R(c gamma, c^2 N) in p, q, m
    noise_coefficient: sp.Expr  # of m, with N_eff' = kappa c^2 N_eff: <= 0 for kappa <= 1
    reduced: sp.Expr  # at q = p^2 and m = 0, in t = gamma p
    argmax: sp.Expr
    bound: sp.Expr


@lru_cache(maxsize=1)
def derive_drop_bound() -> DropBound:
    """The largest drop of R between an SFed cell and the one with c^2 times the clients, ``(c - 1)/(c + 1)``.

    The drop is ``2 gamma p (1 - c) + gamma^2 q (1 - c^2) + gamma^2 m (1/N_eff - c^2/N_eff')``. For c > 1
    its q-coefficient is negative, so it is largest at the smallest admissible q, ``p^2``; its
    m-coefficient is ``gamma^2 (kappa - 1)/(kappa N_eff) <= 0`` with ``N_eff' = kappa c^2 N_eff``, kappa <= 1,
    so it is largest at m = 0. What is left is a concave quadratic in ``t = gamma p``; sympy maximises it."""
    cs = sp.Symbol("c", positive=True)
    drop = sp.expand(end_gradient_ratio(gamma, neff) - end_gradient_ratio(cs * gamma, neff2))
    noise = sp.factor(drop.coeff(m).subs(neff2, kappa * cs**2 * neff))
    reduced = sp.expand(drop.subs({q: p**2, m: 0}).subs(p, t / gamma)).subs(cs, c)
    if not sp.expand(sp.diff(reduced, t, 2)).is_negative:  # -2 delta^2 - 4 delta < 0 for every delta > 0
        raise RuntimeError("the reduced drop should be concave in t for c > 1")
    (t_star,) = sp.solve(sp.diff(reduced, t), t)
    bound = sp.factor(sp.simplify(reduced.subs(t, t_star)).subs(delta, cs - 1))
    return DropBound(drop, noise, reduced.subs(delta, cs - 1), sp.simplify(t_star.subs(delta, cs - 1)), bound)


@lru_cache(maxsize=64)
def drop_bound(gamma_ratio: float) -> float:
    """The largest ``R(gamma, N) - R(c gamma, c^2 N)`` any model of the affine class allows; ``c`` =
    ``gamma_ratio`` > 1 (SFed from N to 4N: c = 2, bound 1/3)."""
    if not gamma_ratio > 1:
        raise ValueError(f"the bound needs gamma to grow between the cells (ratio > 1), got {gamma_ratio}")
    bound = derive_drop_bound().bound
    return float(bound.subs(next(iter(bound.free_symbols)), gamma_ratio))


@lru_cache(maxsize=64)
def noise_difference_ratio(n1: int, n2: int, n3: int) -> float:
    """``(c_N1 - c_N2) / (c_N2 - c_N3)`` with the noise's second moment ``c_N = a + b/N``: the ratio of
    consecutive drops of R at a fixed gamma that every affine end-gradient model gives (a and b cancel)."""
    if not 0 < n1 < n2 < n3:
        raise ValueError(f"need 0 < N1 < N2 < N3, got {n1, n2, n3}")
    a, b = sp.symbols("a b", positive=True)
    c_n = lambda n: a + b / n  # noqa: E731
    ratio = sp.simplify((c_n(n1) - c_n(n2)) / (c_n(n2) - c_n(n3)))
    if ratio.free_symbols:
        raise RuntimeError(f"the ratio should not depend on the noise's parameters: {ratio}")
    return float(ratio)
