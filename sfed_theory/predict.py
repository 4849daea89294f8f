"""Numerical predictions from the derived closed forms (the interface the validation harness uses).

``predicted_norm`` evaluates ``sqrt(E[Q])`` for a quantity Q under a scaling rule, with the closed
form taken from :func:`sfed_theory.derivation.closed_form` and compiled once with
``sympy.lambdify`` (cached). ``predicted_exponent`` is the least-squares log-log slope of
``predicted_norm`` over the grid points a measurement used, so theory and measurement are
compared on identical grids.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import sympy as sp

from sfed_theory.assumptions import MAX_POWER_SUM, SYM, power_sum
from sfed_theory.derivation import closed_form
from sfed_theory.montecarlo import ModelParams
from sfed_theory.rules import RULES, scaling_factor
from sfed_theory.schemes import check_names

__all__ = ["PREDICTABLE", "MOMENT_ARGS", "predicted_norm", "predicted_exponent", "weight_sums", "expected_value",
           "moment_function"]

PREDICTABLE: tuple[str, ...] = ("adapter_output", "update_fro", "grad_A", "grad_B", "aggregation_error")
"""Quantities ``predicted_norm`` accepts (sqrt of a second moment)."""

_ARGS: tuple[sp.Symbol, ...] = (
    SYM.gamma, SYM.d, SYM.k, SYM.r, SYM.N, SYM.rho, SYM.s_A, SYM.s_B, SYM.s_dA, SYM.tau, SYM.eta, SYM.X2,
    SYM.f_in, SYM.phi, SYM.lam, SYM.nu, SYM.kappa, SYM.nu_g, SYM.lam_s, *(power_sum(m) for m in range(2, MAX_POWER_SUM + 1)),
)


MOMENT_ARGS: tuple[str, ...] = tuple(str(a) for a in _ARGS)
"""Positional arguments of :func:`moment_function`'s result, in order (``S2 .. S8`` last)."""


@lru_cache(maxsize=None)
def moment_function(quantity: str, scheme: str, regime: str) -> Callable[..., np.ndarray]:
    """The derived ``E[quantity]`` as a numpy function of :data:`MOMENT_ARGS` (vectorised over arrays)."""
    check_names(quantity, scheme, regime)
    return sp.lambdify(_ARGS, closed_form(quantity, scheme, regime), "numpy", cse=True)


@lru_cache(maxsize=None)
def _compiled(quantity: str, scheme: str, regime: str) -> Callable[..., float]:
    expr = closed_form(quantity, scheme, regime)
    extra = expr.free_symbols - set(_ARGS)
    if extra:  # pragma: no cover - would mean the model grew a symbol predict does not feed
        raise RuntimeError(f"closed form has symbols predict cannot set: {sorted(map(str, extra))}")
    return sp.lambdify(_ARGS, expr, "math", cse=True)


def weight_sums(n_averaged):
    """``(S2, .., S8)`` for equal weights over ``n_averaged`` clients (a number or an array): ``S_m = K^(1 - m)``."""
    return tuple(np.asarray(n_averaged, dtype=float) ** (1 - m) if np.ndim(n_averaged) else float(n_averaged) ** (1 - m)
                 for m in range(2, MAX_POWER_SUM + 1))


def _subset_weight_sums(weights: Sequence[float], n_averaged: int) -> list[tuple[float, ...]]:
    """``(S2, .., S8)`` of the renormalised weights of every K-subset (uniform client sampling)."""
    w = np.asarray(weights, dtype=float)
    if math.comb(w.size, n_averaged) > 20_000:
        raise ValueError("too many client subsets to enumerate; use equal weights or fewer clients")
    out = []
    for subset in itertools.combinations(range(w.size), n_averaged):
        p = w[list(subset)] / w[list(subset)].sum()
        out.append(tuple(float(np.sum(p**m)) for m in range(2, MAX_POWER_SUM + 1)))
    return out  # type: ignore[return-value]


def expected_value(quantity: str, scheme: str, regime: str, params: ModelParams) -> float:
    """The derived ``E[quantity]`` evaluated at the numbers of ``params``.

    The closed forms hold for a fixed set of averaged clients. With unequal weights and partial
    participation the weight sums ``S_m`` are random, so the closed form is averaged over all
    equally likely K-subsets (exact, by enumeration).
    """
    f = _compiled(quantity, scheme, regime)
    kk = params.n_averaged
    if params.weights is None:
        sums = [weight_sums(kk)]
    elif kk == params.n_clients:
        w = np.asarray(params.weights, dtype=float)
        p = w / w.sum()
        sums = [tuple(float(np.sum(p**m)) for m in range(2, MAX_POWER_SUM + 1))]
    else:
        sums = _subset_weight_sums(params.weights, kk)
    base = (params.gamma, params.d, params.k, params.r, kk, params.rho, params.s_A, params.s_B, params.s_dA,
            params.tau, params.eta, params.x_norm2, params.f_in, params.phi, params.lam, params.nu, params.kappa,
            params.gradient_bulk, params.shared_curvature)
    return float(np.mean([f(*base, *s) for s in sums]))


def _positive(name: str, value: float | None) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number > 0, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def predicted_norm(
    quantity: str,
    rule: str,
    *,
    regime: str = "adam",
    scheme: str = "ffa",
    rank: int,
    n_clients: int,
    alpha: float = 16.0,
    rho: float = 0.0,
    participating: int | None = None,
    d: int = 384,
    k: int = 384,
    s_A: float | None = None,
    s_B: float = 1.0,
    tau: float = 1.0,
    eta: float = 1.0,
    x_norm2: float | None = None,
    s_dA: float | None = None,
    f_in: float = 0.0,
    phi: float = 0.0,
    lam: float = 0.0,
    nu: float = 0.0,
    kappa: float = 1.0,
    nu_g: float | None = None,
    lam_s: float | None = None,
) -> float:
    """Predicted RMS size ``sqrt(E[Q])`` of a quantity after one aggregation round.

    Parameters
    ----------
    quantity:
        ``"adapter_output"`` (``||gamma * dW_agg x||``), ``"update_fro"`` (``||dW||_F``),
        ``"grad_A"``, ``"grad_B"`` (gradient norms at the aggregated adapter for an output gradient
        with iid entries of variance ``tau^2``) or ``"aggregation_error"``
        (``||dW - dW_exact||_F``; schemes ffa, fedit, exact).
    rule:
        Scaling rule of :func:`sfed_theory.scaling_factor`; for ``"sfed-general"`` ``rho`` and
        ``participating`` are passed on.
    regime, scheme:
        ``"adam"``, ``"adam-refined"`` or ``"sgd"``; ``"fedit"``, ``"fedsa"``, ``"ffa"`` or ``"exact"``.
    rank, n_clients, participating:
        r, N and K (clients averaged per round, equal weights; default N), so ``S2 = 1/K``. Every
        rule's gamma is taken at K, the number of clients averaged, as the harness sets it
        (``sfed``: ``alpha*sqrt(K/r)``).
    rho:
        Client correlation of the increments, in [-1, 1] (the model's closed forms hold while
        ``rho + (1 - rho)/K > 0``; ``sfed-general`` itself only takes rho in [0, 1]).
    d, k, s_A, s_B, tau, eta, x_norm2:
        Layer sizes, init std of A (default ``1/sqrt(k)``), std of a client's B increment (Adam),
        gradient std, SGD learning rate, ``||x||^2`` of the probe input (default ``k``).
    s_dA:
        Std of a client's A increment in the Adam regime for fedit/fedsa/exact (default ``s_B``:
        a sign-like step moves entries of A and B by the same amount). Unused by FFA and SGD.
    f_in, phi, lam, nu, kappa, nu_g:
        The refined model's parameters (regime ``"adam-refined"``, see
        :data:`sfed_theory.assumptions.REGIMES`): input-coherent share of B's increment and the
        share of its output direction along the loss gradient (both in [0, 1]), the curvature
        along the update, the probe's isotropic input bulk per coordinate (``C = x x^T + nu I``,
        >= 0; 0: the spike alone), the cosine of the probe gradient's input direction with the
        tokens' spike (in [0, 1]), and the bulk of the gradient's token weighting (``C_g = z z^T +
        nu_g I``; default ``nu``). ``kappa = 1`` with ``nu_g = nu`` is one probe vector. Ignored by
        the other regimes.
    lam_s:
        The curvature met by the update's shared part, the share of B built from the descent direction
        every client shares (refined regime; default ``lam``: one curvature for the whole update).

    Raises
    ------
    ValueError
        On an unknown quantity, rule, regime or scheme, or an out-of-range number.
    """
    if quantity not in PREDICTABLE:
        raise ValueError(f"unknown quantity {quantity!r}; allowed: {', '.join(PREDICTABLE)}")
    check_names(quantity, scheme, regime)
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; allowed rules: {', '.join(RULES)}")
    r = _count("rank", rank)
    n = _count("n_clients", n_clients)
    kk = n if participating is None else _count("participating", participating)
    if kk > n:
        raise ValueError(f"participating={kk} exceeds n_clients={n}: at most N of N clients can take part")
    rho_f = float(rho)
    if not (math.isfinite(rho_f) and -1.0 <= rho_f <= 1.0):
        raise ValueError(f"rho (client correlation) must lie in [-1, 1], got {rho!r}")
    for name, v, what in (("f_in", f_in, "a share"), ("phi", phi, "a share"), ("kappa", kappa, "a cosine's size")):
        if not (math.isfinite(float(v)) and 0.0 <= float(v) <= 1.0):
            raise ValueError(f"{name} is {what} and must lie in [0, 1], got {v!r}")
    lam_s = lam if lam_s is None else lam_s
    for name, v in (("lam", lam), ("lam_s", lam_s)):
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must be finite, got {v!r}")
    nu_g = nu if nu_g is None else nu_g
    for name, v in (("nu", nu), ("nu_g", nu_g)):
        if not (math.isfinite(float(v)) and float(v) >= 0.0):
            raise ValueError(f"{name} is an input variance and must be finite and >= 0, got {v!r}")
    dd, kd = _count("d", d), _count("k", k)
    s_a = 1.0 / math.sqrt(kd) if s_A is None else _positive("s_A", s_A)
    s_b = _positive("s_B", s_B)
    s_da = s_b if s_dA is None else _positive("s_dA", s_dA)
    x2 = float(kd) if x_norm2 is None else _positive("x_norm2", x_norm2)
    # one convention everywhere (harness, predictor, analysis): a rule's N is K, the clients averaged
    gamma = (scaling_factor(rule, alpha, r, n, rho=rho_f, participating=kk) if rule == "sfed-general"
             else scaling_factor(rule, alpha, r, kk))
    f = _compiled(quantity, scheme, regime)
    value = f(gamma, dd, kd, r, kk, rho_f, s_a, s_b, s_da, _positive("tau", tau), _positive("eta", eta), x2,
              float(f_in), float(phi), float(lam), float(nu), float(kappa), float(nu_g), float(lam_s),
              *weight_sums(kk))
    return math.sqrt(max(float(value), 0.0))


def predicted_exponent(
    quantity: str,
    rule: str,
    *,
    wrt: str,
    ranks: Sequence[int] | int,
    n_clients: Sequence[int] | int,
    **kw: object,
) -> float:
    """Least-squares log-log slope of :func:`predicted_norm` in ``wrt`` over measured grid points.

    ``ranks`` and ``n_clients`` are the grid a measurement used (``participating``, in ``kw``, may
    be one K for all points or one per point): either one of them is a scalar
    and the other a sequence, or both are sequences of equal length (paired points). If the
    other variable also varies across the points, ``log norm`` is regressed on both ``log r`` and
    ``log N`` and the coefficient of ``wrt`` is returned (a partial slope). ``**kw`` goes to
    ``predicted_norm`` (regime, scheme, alpha, rho, ...).
    """
    if wrt not in ("rank", "n_clients"):
        raise ValueError(f"wrt must be 'rank' or 'n_clients', got {wrt!r}")
    r_list = [ranks] if isinstance(ranks, (int, np.integer)) else list(ranks)
    n_list = [n_clients] if isinstance(n_clients, (int, np.integer)) else list(n_clients)
    if not r_list or not n_list:
        raise ValueError("ranks and n_clients must not be empty")
    if len(r_list) == 1:
        r_list = r_list * len(n_list)
    if len(n_list) == 1:
        n_list = n_list * len(r_list)
    if len(r_list) != len(n_list):
        raise ValueError(f"ranks ({len(r_list)}) and n_clients ({len(n_list)}) must have equal length "
                         "when both are sequences (paired grid points)")
    part = kw.pop("participating", None)
    k_list = list(part) if isinstance(part, (list, tuple, np.ndarray)) else [part] * len(r_list)
    if len(k_list) != len(r_list):
        raise ValueError(f"participating has {len(k_list)} entries for {len(r_list)} grid points")
    x = np.log(np.asarray(r_list if wrt == "rank" else n_list, dtype=float))
    other = np.log(np.asarray(n_list if wrt == "rank" else r_list, dtype=float))
    if np.unique(x).size < 2:
        raise ValueError(f"need at least two distinct values of {wrt} to fit a slope")
    y = np.log([predicted_norm(quantity, rule, rank=int(r), n_clients=int(n),  # type: ignore[arg-type]
                               participating=None if kk is None else int(kk), **kw)
                for r, n, kk in zip(r_list, n_list, k_list)])
    cols = [np.ones_like(x), x]
    if np.unique(other).size > 1:
        cols.append(other)
    design = np.column_stack(cols)
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError("log rank and log n_clients are collinear on this grid; the slope in "
                         f"{wrt} is not identifiable (vary one of them at a time)")
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(coef[1])
