"""Every closed form against a Monte Carlo estimate of the same random model.

A closed form passes when it lies in ``mean +- Z * SE`` of 20,000 simulated samples. With
Z = 5 a false failure has probability ~6e-7 per comparison under the normal approximation
(the per-sample quantities are products of up to eight Gaussians, hence skewed, but 20,000
samples keep the mean close to normal); the tests below also show that the same interval
rejects plausible wrong formulas, so the check has power.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from sfed_theory.assumptions import REGIMES, SCHEMES, SYM, power_sum
from sfed_theory.derivation import closed_form, solve_invariance
from sfed_theory.montecarlo import Estimate, ModelParams, simulate, simulate_loop
from sfed_theory.predict import expected_value
from sfed_theory.rules import scaling_factor

Z = 5.0
SAMPLES = 20_000


def _agrees(est: Estimate, theory: float, scale: float) -> bool:
    if abs(theory) <= 1e-12 * (1.0 + scale):  # a zero (the closed form's own evaluation may round off)
        return abs(est.mean) <= 1e-20 * (1.0 + scale)
    return est.contains(theory, Z)


def _check_all(params: ModelParams, scheme: str, regime: str, seed: int) -> list[str]:
    est = simulate(params, scheme, regime, n_samples=SAMPLES, seed=seed)
    scale = expected_value("update_fro", scheme, regime, params)
    bad = []
    for q, e in est.items():
        th = expected_value(q, scheme, regime, params)
        if not _agrees(e, th, scale):
            bad.append(f"{q} [{scheme}/{regime}]: closed form {th:.6g}, MC {e.mean:.6g} +- {Z}*{e.se:.3g}")
    return bad


BASE = ModelParams(d=4, k=5, r=3, n_clients=4, gamma=0.8, rho=0.25, s_A=0.7, s_B=1.1, s_dA=0.5, tau=0.9,
                   eta=0.6, x_norm2=1.5, f_in=0.4, phi=0.6, lam=0.7, nu=0.3, kappa=0.45, lam_s=-0.4)  # the refined regime's


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_each_closed_form_at_a_fixed_model(scheme, regime):
    assert _check_all(BASE, scheme, regime, seed=11) == []


@st.composite
def models(draw: st.DrawFn) -> tuple[ModelParams, str, str, int]:
    n, k = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    weights = draw(st.none() | st.lists(st.floats(0.1, 5.0), min_size=n, max_size=n).map(tuple))
    params = ModelParams(
        d=draw(st.integers(1, 5)), k=k, r=draw(st.integers(1, 4)), n_clients=n,
        gamma=draw(st.floats(0.2, 2.0)), rho=draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
        weights=weights, participating=draw(st.none() | st.integers(1, n)),
        s_A=draw(st.floats(0.3, 2.0)), s_B=draw(st.floats(0.3, 2.0)), s_dA=draw(st.floats(0.3, 2.0)),
        tau=draw(st.floats(0.3, 2.0)), eta=draw(st.floats(0.3, 2.0)), x_norm2=draw(st.floats(0.5, 3.0)),
        f_in=draw(st.floats(0.05, 1.0)), phi=draw(st.floats(0.05, 1.0)), lam=draw(st.floats(-1.0, 1.0)),
        nu=draw(st.sampled_from([0.0]) | st.floats(0.0, 1.0)),
        kappa=draw(st.sampled_from([1.0]) | (st.floats(0.0, 1.0) if k > 1 else st.nothing())),
        lam_s=draw(st.none() | st.floats(-1.0, 1.0)),
    )
    return params, draw(st.sampled_from(list(SCHEMES))), draw(st.sampled_from(list(REGIMES))), draw(st.integers(0, 10**6))


@settings(derandomize=True, max_examples=100, deadline=None)
@given(models())
def test_closed_forms_agree_with_monte_carlo_over_random_models(case):
    params, scheme, regime, seed = case
    assert _check_all(params, scheme, regime, seed) == []


def _eval(expr: sp.Expr, p: ModelParams) -> float:
    kk = p.n_averaged
    vals = {SYM.gamma: p.gamma, SYM.d: p.d, SYM.k: p.k, SYM.r: p.r, SYM.rho: p.rho, SYM.s_A: p.s_A,
            SYM.s_B: p.s_B, SYM.s_dA: p.s_dA, SYM.tau: p.tau, SYM.eta: p.eta, SYM.X2: p.x_norm2, SYM.N: kk}
    if p.weights is None:
        vals.update({power_sum(m): kk ** (1 - m) for m in range(2, 9)})
    else:
        w = np.asarray(p.weights) / np.sum(p.weights)
        vals.update({power_sum(m): float(np.sum(w**m)) for m in range(2, 9)})
    return float(expr.subs(vals))


def test_monte_carlo_rejects_wrong_formulas():
    """The same interval rejects plausible mistakes: the check is not vacuous."""
    s2, s3 = power_sum(2), power_sum(3)
    # (a) FedIT aggregation error: the derived S2^2 + S2 - 2 S3 vs the equal-weight look-alike S2 - S2^2
    p = ModelParams(d=4, k=4, r=3, n_clients=4, gamma=1.0, rho=0.1, weights=(1.0, 2.0, 3.0, 4.0), s_dA=0.8)
    est = simulate(p, "fedit", "adam", n_samples=SAMPLES, seed=3)["aggregation_error"]
    right = closed_form("aggregation_error", "fedit", "adam")
    wrong = right / (s2**2 + s2 - 2 * s3) * (s2 - s2**2)
    assert est.contains(_eval(right, p), Z) and not est.contains(_eval(wrong, p), Z)
    # (b) SGD update: the Wishart (k + r + 1) vs a Gaussian-like (k + r)
    p = ModelParams(d=3, k=2, r=1, n_clients=3, gamma=1.0, rho=0.3)
    est = simulate(p, "ffa", "sgd", n_samples=SAMPLES, seed=4)["update_fro"]
    right = closed_form("update_fro", "ffa", "sgd")
    wrong = right / (SYM.k + SYM.r + 1) * (SYM.k + SYM.r)
    assert est.contains(_eval(right, p), Z) and not est.contains(_eval(wrong, p), Z)
    # (c) partial participation: S2 = 1/K, not 1/N
    p = ModelParams(d=4, k=4, r=3, n_clients=6, participating=2, gamma=1.0, rho=0.0)
    est = simulate(p, "ffa", "adam", n_samples=SAMPLES, seed=5)["adapter_output"]
    right = closed_form("adapter_output", "ffa", "adam")
    assert est.contains(_eval(right, p), Z) and not est.contains(_eval(right.subs(s2, 1 / 6), p), Z)


def test_loop_reference_agrees_with_vectorised_sampler():
    p = ModelParams(d=3, k=4, r=2, n_clients=3, gamma=0.9, rho=0.4, weights=(1.0, 2.0, 0.5), s_dA=0.7)
    for scheme, regime in (("fedit", "adam"), ("fedsa", "sgd")):
        loop = simulate_loop(p, scheme, regime, n_samples=3_000, seed=1)
        vec = simulate(p, scheme, regime, n_samples=3_000, seed=2)
        for q in loop:  # the loop covers the aggregate's quantities, not the client projections
            diff = loop[q].mean - vec[q].mean
            se = math.hypot(loop[q].se, vec[q].se)
            th = expected_value(q, scheme, regime, p)
            assert abs(diff) <= Z * se + 1e-18, (q, scheme, regime)
            if th != 0:
                assert loop[q].contains(th, Z), (q, scheme, regime)


@pytest.mark.parametrize(("scheme", "regime"), [("ffa", "adam"), ("fedit", "adam"), ("ffa", "sgd")])
def test_moment_is_flat_in_rank_and_clients_under_solved_gamma_by_simulation(scheme, regime):
    gstar = sp.lambdify((SYM.alpha, SYM.r, SYM.rho, SYM.k, SYM.s_A, SYM.s_dA, power_sum(2)),
                        solve_invariance(scheme, regime).gamma_star, "math")
    alpha, rho, k = 1.3, 0.2, 4
    ref = None
    for r, n in ((1, 1), (4, 1), (1, 6), (4, 6), (8, 3)):
        p = ModelParams(d=3, k=k, r=r, n_clients=n, rho=rho, s_A=0.6, s_dA=0.4,
                        gamma=gstar(alpha, r, rho, k, 0.6, 0.4, 1.0 / n))
        est = simulate(p, scheme, regime, n_samples=SAMPLES, seed=r * 100 + n, quantities=("adapter_output",))
        e = est["adapter_output"]
        if ref is None:
            ref = expected_value("adapter_output", scheme, regime,
                                 ModelParams(d=3, k=k, r=1, n_clients=1, gamma=alpha, s_A=0.6, s_dA=0.4))
        assert e.contains(ref, Z), (r, n, e.mean, ref)
    if scheme == "ffa" and regime == "adam":  # the derived gamma* is the project's sfed-general rule
        assert gstar(alpha, 4, rho, k, 0.6, 0.4, 1 / 6) == pytest.approx(
            scaling_factor("sfed-general", alpha, 4, 6, rho=rho))


def test_sfed_rule_is_not_flat_under_sgd_by_simulation():
    """A finding, not a bug: with SGD the increment carries gamma, so sqrt(N/r) over-corrects in N."""
    vals = []
    for n in (1, 8):
        p = ModelParams(d=3, k=4, r=2, n_clients=n, gamma=scaling_factor("sfed", 1.0, 2, n), s_A=0.5)
        vals.append(simulate(p, "ffa", "sgd", n_samples=SAMPLES, seed=n, quantities=("adapter_output",))["adapter_output"])
    # theory: E||y||^2 ~ gamma^4 c_N ~ N^2 / N = N, so the ratio is 8
    ratio = vals[1].mean / vals[0].mean
    rel_se = math.hypot(vals[0].se / vals[0].mean, vals[1].se / vals[1].mean)
    assert abs(ratio - 8.0) <= Z * rel_se * ratio
    assert abs(ratio - 1.0) > Z * rel_se * ratio


def test_monte_carlo_sees_the_probes_input_bulk():
    """With an input bulk (C = x x^T + nu I) the derived forms carry it: the same forms with the bulk dropped
    (nu = 0) fall outside the Monte Carlo interval for the output and for both gradients at the end."""
    from dataclasses import replace

    p = replace(BASE, nu=0.6, n_clients=2)
    est = simulate(p, "fedit", "adam-refined", n_samples=SAMPLES, seed=12)
    for q in ("adapter_output", "grad_A", "grad_B"):
        assert est[q].contains(expected_value(q, "fedit", "adam-refined", p), Z), q
        assert not est[q].contains(expected_value(q, "fedit", "adam-refined", replace(p, nu=0.0)), Z), q


@pytest.mark.parametrize("scheme", ["ffa", "fedit", "fedsa"])
def test_monte_carlo_sees_the_shared_parts_own_curvature(scheme):
    """The update's shared part meets its own curvature lambda_s: the derived gradients carry it (one curvature,
    lambda_s = lambda, falls outside the Monte Carlo interval), and the shared part's output is what the
    sampler's shared update puts on the probe's tokens."""
    from dataclasses import replace

    p = replace(BASE, phi=0.9, lam=0.2, lam_s=-1.5, n_clients=2)
    est = simulate(p, scheme, "adam-refined", n_samples=SAMPLES, seed=13)
    for q in ("grad_A", "grad_B", "shared_output"):
        assert est[q].contains(expected_value(q, scheme, "adam-refined", p), Z), q
    for q in ("grad_A", "grad_B"):
        assert not est[q].contains(expected_value(q, scheme, "adam-refined", replace(p, lam_s=None)), Z), q
    assert est["shared_output"].mean < est["adapter_output"].mean
