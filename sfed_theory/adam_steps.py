"""Adam's second local step against its first, per coordinate (derived): why it follows gamma only past a threshold.

Bias-corrected Adam with ``eps -> 0`` moves a coordinate by ``-lr m_hat / sqrt(v_hat)``. Its first step is
``-lr sign(g0)`` whatever the gradient's size, so a client's first increment cannot depend on the forward scale gamma
(the one-round model's premise, which the one-step runs confirm). The second step sees ``g1 = g0 (1 + x)``, ``x`` the
first step's own relative change of that coordinate's gradient. Under a LoRA scale gamma the first step moves the
output by gamma times its size and dL/dB carries another gamma, so at a fixed loss curvature ``x`` grows as gamma^2.

:func:`derive_second_step` runs the two recursions in sympy and returns the ratio ``f(x)`` of the second step to the
first, its slope at ``x = 0`` and its zero. The slope is ``1/(1 + beta1) - 1/(1 + beta2)`` (0.026 at PyTorch's
defaults): m_hat and sqrt(v_hat) move almost together, so to first order the second step ignores the first's effect,
when the two steps see the same batch. Away from 0 the response is steep: the second step is cut by 7% at
``x = -1/2``, by a third at ``x = -1`` (slope 0.75 there) and vanishes at ``x = -(1 + beta1)``. Where a round's
clients operate is measured by :mod:`validation.second_step`: on the default task each new batch moves the gradient
by about its own size (median x near -1), so the second step answers the first's effect at first order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import sympy as sp

__all__ = ["SecondStep", "derive_second_step", "second_step_ratio", "second_step_slope"]

x = sp.Symbol("x", real=True)
beta1, beta2 = sp.symbols("beta1 beta2", positive=True)


@dataclass(frozen=True)
class SecondStep:
    """The derivation's results: ``ratio`` f(x; beta1, beta2), its ``slope`` at x = 0 and its ``zero`` in x."""

    ratio: sp.Expr
    slope: sp.Expr
    zero: sp.Expr


@lru_cache(maxsize=1)
def derive_second_step() -> SecondStep:
    """Adam's first two steps on one coordinate whose gradient is 1, then ``1 + x`` (a positive first gradient loses
    no generality: both steps flip with its sign)."""
    g0, g1 = sp.Integer(1), 1 + x
    m1, v1 = (1 - beta1) * g0, (1 - beta2) * g0**2
    m2, v2 = beta1 * m1 + (1 - beta1) * g1, beta2 * v1 + (1 - beta2) * g1**2

    def step(m: sp.Expr, v: sp.Expr, t: int) -> sp.Expr:  # -lr m_hat / sqrt(v_hat), in units of lr
        return -sp.cancel(m / (1 - beta1**t)) / sp.sqrt(sp.factor(sp.cancel(v / (1 - beta2**t))))

    first = sp.simplify(step(m1, v1, 1))  # -1: the sign of the gradient
    ratio = sp.simplify(step(m2, v2, 2) / first)
    slope = sp.simplify(sp.diff(ratio, x).subs(x, 0))
    zero = sp.solve(sp.Eq(sp.numer(sp.together(m2)), 0), x)
    if len(zero) != 1:
        raise RuntimeError(f"expected one zero of the second step's first moment, got {zero}")
    return SecondStep(ratio=ratio, slope=slope, zero=sp.simplify(zero[0]))


@lru_cache(maxsize=2)
def _function(derivative: bool):
    ratio = derive_second_step().ratio
    return sp.lambdify((x, beta1, beta2), sp.diff(ratio, x) if derivative else ratio, "numpy")


def _evaluate(derivative: bool, xs, beta1: float, beta2: float) -> np.ndarray:
    if not (0 < beta1 < 1 and 0 < beta2 < 1):
        raise ValueError(f"Adam's betas must lie in (0, 1), got beta1={beta1}, beta2={beta2}")
    return np.asarray(_function(derivative)(np.asarray(xs, dtype=float), beta1, beta2), dtype=float)


def second_step_ratio(xs, beta1: float = 0.9, beta2: float = 0.999) -> np.ndarray:
    """f(x): Adam's second step over its first on a coordinate whose gradient the first step changed by the fraction
    ``x`` (a number or an array; defined for every real x, where the second moment stays positive). ValueError for
    betas outside (0, 1)."""
    return _evaluate(False, xs, beta1, beta2)


def second_step_slope(xs, beta1: float = 0.9, beta2: float = 0.999) -> np.ndarray:
    """f'(x), the derived derivative of :func:`second_step_ratio`: how strongly the second step answers a small common
    change of the gradient at ``x``. ValueError for betas outside (0, 1)."""
    return _evaluate(True, xs, beta1, beta2)
