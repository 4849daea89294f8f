"""Derive the closed-form moments and solve the invariance condition for gamma.

``derive(quantity, scheme, regime)`` builds the index expression (:mod:`sfed_theory.schemes`),
takes its expectation by Wick pairings and delta contraction (:mod:`sfed_theory.wick`) and keeps
every step for printing. ``solve_invariance`` then asks sympy for the gamma that keeps the moment
at its single-client, rank-1 value. Results are cached (``lru_cache``): the first full derivation
takes about a second, later calls are dictionary look-ups.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

from sfed_theory import form_store
from sfed_theory.assumptions import MAX_POWER_SUM, REGIMES, SCHEMES, SYM, power_sum
from sfed_theory.schemes import QUANTITIES, QUANTITY_TEXT, build, check_names
from sfed_theory.wick import Pairing, Term, expect, term_latex

__all__ = [
    "Derivation",
    "Invariance",
    "C_N",
    "derive",
    "closed_form",
    "derive_all",
    "defined_combinations",
    "solve_invariance",
    "in_terms_of_c",
    "clear_caches",
    "solve_step_size",
    "lr_transfer_factor",
]

C_N = sp.Symbol("c_N", positive=True)
"""Display symbol for ``rho + (1 - rho) * S2 = 1 / N_eff`` (used only for printing)."""

_WEIGHT_SUMS = tuple(power_sum(m) for m in range(2, MAX_POWER_SUM + 1))


@dataclass(frozen=True)
class Derivation:
    """Every step of one derivation: the index expression, the pairings, the closed form."""

    quantity: str
    scheme: str
    regime: str
    terms: tuple[Term, ...]
    pairings: tuple[Pairing, ...]
    result: sp.Expr  # factored closed form of the expectation

    def latex(self) -> str:
        """The derivation as LaTeX lines: quantity, index expression, pairings, result."""
        lines = [rf"\text{{{self.quantity}, scheme {self.scheme}, regime {self.regime}}}"]
        expr = " + ".join(term_latex(t) for t in self.terms)
        lines.append(rf"Q = {expr}")
        for p in self.pairings:
            lines.append(rf"[{p.term}]\ {p.latex()}")
        lines.append(rf"\mathbb{{E}}[Q] = {sp.latex(self.result)}")
        return "\n".join(lines)

    def text(self, steps: bool = True) -> str:
        """Plain-text summary (the pairings only as a count unless ``steps``)."""
        head = f"{self.quantity} [{self.scheme}/{self.regime}]: {QUANTITY_TEXT[self.quantity]}"
        lines = [head, f"  index terms: {len(self.terms)}, Wick pairings (after rho split): {len(self.pairings)}"]
        if steps:
            for t in self.terms:
                lines.append(f"  term: {term_latex(t)}")
            for p in self.pairings:
                lines.append(f"  pairing[{p.term}]: {p.text()}")
        lines.append(f"  E = {self.result}")
        lines.append(f"    = {in_terms_of_c(self.result)}   (c_N = rho + (1 - rho)*S2)")
        return "\n".join(lines)


@lru_cache(maxsize=None)
def derive(quantity: str, scheme: str = "ffa", regime: str = "adam") -> Derivation:
    """Derive ``E[quantity]`` for an aggregation scheme and optimizer regime (cached)."""
    check_names(quantity, scheme, regime)
    terms = build(quantity, scheme, regime)
    total, pairings = expect(terms)
    return Derivation(quantity, scheme, regime, tuple(terms), tuple(pairings), sp.factor(total))


@lru_cache(maxsize=None)
def closed_form(quantity: str, scheme: str = "ffa", regime: str = "adam") -> sp.Expr:
    """The derived closed form of ``E[quantity]`` (a sympy expression): from :mod:`sfed_theory.form_store`
    when this code derived it before, in any process; else derived (:func:`derive`) and stored."""
    check_names(quantity, scheme, regime)
    stored = form_store.load(quantity, scheme, regime)
    if stored is not None:
        return stored
    result = derive(quantity, scheme, regime).result
    form_store.save(quantity, scheme, regime, result)
    return result


def defined_combinations() -> list[tuple[str, str, str]]:
    """All (quantity, scheme, regime) combinations the model defines."""
    out = []
    for q, s, r in itertools.product(QUANTITIES, SCHEMES, REGIMES):
        try:
            check_names(q, s, r)
        except ValueError:
            continue
        out.append((q, s, r))
    return out


def derive_all() -> dict[tuple[str, str, str], Derivation]:
    """Derive every defined combination (cached individually)."""
    return {key: derive(*key) for key in defined_combinations()}


def in_terms_of_c(expr: sp.Expr) -> sp.Expr:
    """Rewrite ``S2`` through ``c_N = rho + (1 - rho) S2`` for display; the identity is checked."""
    s2 = power_sum(2)
    if not expr.has(s2) or any(expr.has(power_sum(m)) for m in range(3, 5)):
        return expr  # higher weight sums do not collapse into c_N; the factored form reads better
    out = sp.factor(sp.expand(expr.subs(s2, (C_N - SYM.rho) / (1 - SYM.rho))))
    back = sp.expand(out.subs(C_N, SYM.rho + (1 - SYM.rho) * s2) - expr)
    if sp.simplify(back) != 0:  # pragma: no cover - a display bug must not pass silently
        raise AssertionError("display rewrite changed the expression")
    return out


@dataclass(frozen=True)
class Invariance:
    """The invariance condition ``Q(gamma; r, S) = Q(alpha; r = 1, N = 1)`` and its solution."""

    quantity: str
    scheme: str
    regime: str
    equation: sp.Eq
    roots: tuple[sp.Expr, ...]  # everything sympy.solve returned
    gamma_star: sp.Expr  # the root that is real and positive
    at_rho0_equal: sp.Expr  # gamma_star at rho = 0, S_m = N^(1-m)
    at_one_client: sp.Expr  # gamma_star at N = 1 (all S_m = 1)
    at_rho1: sp.Expr  # gamma_star at rho = 1
    power: int  # degree of gamma in the moment (2: Adam-like, 4: SGD adapter moments)

    def readable(self) -> sp.Expr:
        """``gamma*^power`` written with ``c_N`` (a rational expression, easy to read)."""
        return in_terms_of_c(sp.factor(self.gamma_star**self.power))


@lru_cache(maxsize=None)
def solve_invariance(scheme: str = "ffa", regime: str = "adam", quantity: str = "adapter_output") -> Invariance:
    """Solve for the gamma that keeps ``E[quantity] / d`` at its ``r = 1, N = 1, gamma = alpha`` value.

    The reference value is the same closed form at rank 1 and one client (``S_m = 1``) with
    ``gamma = alpha``, so the condition reads "as large as a rank-1 single-client adapter with
    scale alpha", whatever r and N.
    """
    q = closed_form(quantity, scheme, regime)
    if not q.has(SYM.gamma):
        raise ValueError(f"{quantity} [{scheme}/{regime}] does not depend on gamma; nothing to solve")
    reference = q.subs({SYM.gamma: SYM.alpha, SYM.r: 1, **{s: 1 for s in _WEIGHT_SUMS}})
    eq = sp.Eq(q / SYM.d, reference / SYM.d)
    roots = tuple(sp.solve(eq, SYM.gamma))
    positive = [z for z in roots if _positive_at_generic_point(z)]
    if len(positive) != 1:
        raise RuntimeError(f"expected one positive root for gamma, sympy returned {roots}")
    g = sp.simplify(positive[0])
    n = SYM.N
    equal = {power_sum(m): n ** (1 - m) for m in range(2, MAX_POWER_SUM + 1)}
    return Invariance(
        quantity, scheme, regime, eq, roots, g,
        at_rho0_equal=sp.simplify(g.subs(SYM.rho, 0).subs(equal)),
        at_one_client=sp.simplify(g.subs({s: 1 for s in _WEIGHT_SUMS})),
        at_rho1=sp.simplify(g.subs(SYM.rho, 1)),
        power=int(sp.degree(sp.expand(q), SYM.gamma)),
    )


_IN_RANGE = {SYM.rho: sp.Rational(1, 5), SYM.f_in: sp.Rational(1, 4), SYM.phi: sp.Rational(1, 3),
             **{power_sum(m): sp.Integer(3) ** (1 - m) for m in range(2, MAX_POWER_SUM + 1)}}
"""Values inside their ranges for the bounded symbols (shares in [0, 1], the weight sums of 3 equal clients)."""


def _positive_at_generic_point(z: sp.Expr) -> bool:
    point = {s: _IN_RANGE.get(s, sp.Rational(3, 7) + sp.Rational(i, 5))
             for i, s in enumerate(sorted(z.free_symbols, key=str))}
    val = complex(z.subs(point).evalf())
    return abs(val.imag) < 1e-12 and val.real > 0


def clear_caches() -> None:
    """Forget every cached derivation (for cold-start timing)."""
    derive.cache_clear()
    closed_form.cache_clear()
    solve_invariance.cache_clear()
    solve_step_size.cache_clear()
    _step_size_fn.cache_clear()


_TARGET = sp.Symbol("T", positive=True)  # the output size a tuned learning rate aims for, E||y||^2 / d


@lru_cache(maxsize=None)
def solve_step_size(scheme: str = "ffa", quantity: str = "adapter_output", regime: str = "adam") -> sp.Expr:
    """The client increment scale ``s_B*`` that puts ``E[quantity] / d`` at a target ``T`` (Adam regimes).

    Under Adam-like updates a client's increment is about the learning rate per entry, so ``s_B`` is
    proportional to lr and ``s_B*`` is where the tuned learning rate sits: ``sympy.solve`` of the
    derived moment for ``s_B``. For FFA in the canonical regime ``s_B* = sqrt(T) / (gamma s_A sqrt(X2 r
    c_N))``: the tuned lr scales like ``1 / (gamma sqrt(r c_N))``. In ``adam-refined`` a share ``f_in`` of
    B's increment lies along the client's input direction ``(A x)^T``; its output adds coherently over the
    rank (``~ r^2`` in the second moment), so at large ``r`` the tuned lr moves towards ``1 / (gamma r)``.
    For FedIT, FedSA and exact the A increment is set to 0 here: starting from B = 0 it enters the output
    at second order in lr (B's step times A's step).
    """
    if regime not in ("adam", "adam-refined"):
        raise ValueError(f"unknown regime {regime!r}; the step-size solution needs 'adam' or 'adam-refined'")
    q = closed_form(quantity, scheme, regime).subs({SYM.s_dA: 0, SYM.kappa: 1, SYM.nu_g: SYM.nu})  # one probe vector
    roots = [z for z in sp.solve(sp.Eq(q / SYM.d, _TARGET), SYM.s_B) if _positive_at_generic_point(z)]
    if len(roots) != 1:
        raise RuntimeError(f"expected one positive root for s_B, sympy returned {roots}")
    return sp.simplify(roots[0])


@lru_cache(maxsize=None)
def _step_size_fn(scheme: str, regime: str):
    """:func:`solve_step_size` at equal client weights as a float function of (gamma, r, rho, n, f_in, phi,
    nu, k, s_A, X2, T)."""
    n = sp.Symbol("n", positive=True)
    expr = solve_step_size(scheme, "adapter_output", regime)
    expr = expr.subs({power_sum(m): n ** (1 - m) for m in range(2, MAX_POWER_SUM + 1)})
    return sp.lambdify((SYM.gamma, SYM.r, SYM.rho, n, SYM.f_in, SYM.phi, SYM.nu, SYM.k, SYM.s_A, SYM.X2, _TARGET),
                       expr, "math")


def lr_transfer_factor(rule: str, alpha: float, reference: tuple[int, int], cell: tuple[int, int], *,
                       rho: float = 0.0, scheme: str = "ffa", regime: str = "adam", f_in: float = 0.0,
                       phi: float = 0.0, nu: float = 0.0, k: int | None = None) -> float:
    """Predicted ``lr*(cell) / lr*(reference)`` for a rule, cells given as ``(rank, n_clients)``.

    From :func:`solve_step_size` at the rule's gamma (taken at K = N clients averaged) and the client
    correlation ``rho`` (same weights for all clients): SFed keeps it near 1 (exactly 1 at rho = 0),
    rsLoRA gives ``sqrt(N)``-like growth, LoRA ``sqrt(N r)``. ``regime="adam-refined"`` with the
    input-coherent share ``f_in`` and its gradient-aligned part ``phi`` (estimated elsewhere, e.g. by
    :func:`validation.refined.fit_refined` on a pilot) gives the refined model's transfer; ``nu`` is the probe's
    input bulk (0: one probe vector, the output's size at the shared direction only) for layers of input size ``k``
    (needed when ``nu > 0``: the bulk sees all k input coordinates)."""
    from sfed_theory.rules import scaling_factor

    for name, v in (("f_in", f_in), ("phi", phi)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {v}")
    if not (math.isfinite(nu) and nu >= 0.0):
        raise ValueError(f"nu must be finite and >= 0, got {nu}")
    if nu > 0 and (k is None or k < 1):
        raise ValueError(f"an input bulk nu > 0 needs the layers' input size k, got k={k}")
    f = _step_size_fn(scheme, regime)

    def at(r: int, n_clients: int) -> float:
        return f(scaling_factor(rule, alpha, r, n_clients), r, rho, n_clients, f_in, phi, nu, k or 1, 1.0, 1.0, 1.0)

    return at(*cell) / at(*reference)
