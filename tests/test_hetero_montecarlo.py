"""Every heterogeneous-rank closed form against a Monte Carlo estimate of the same random model.

As in tests/test_theory_montecarlo.py: a closed form passes when it lies in ``mean +- 5 SE`` of
20,000 simulated samples, and the same interval rejects plausible wrong formulas. The SVD download
has no closed form; it is checked against what must hold sample by sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from sfed_theory import client_scaling_factors
from sfed_theory.assumptions import SYM, power_sum
from sfed_theory.derivation import closed_form
from sfed_theory.hetero import A_INITS, REGIMES_H, SCHEME_TEXT, VARIANTS, NoClosedForm
from sfed_theory.hetero_montecarlo import HeteroParams, expected_hetero, simulate_hetero, simulated_quantities
from sfed_theory.montecarlo import Estimate

Z = 5.0
SAMPLES = 20_000
COMBOS = [(s, v, r, a) for s in SCHEME_TEXT for v in VARIANTS for r in REGIMES_H for a in A_INITS
          if not (s == "zero-pad" and a == "independent")]


def _disagreements(params: HeteroParams, combo: tuple[str, str, str, str], seed: int) -> tuple[list[str], list[float]]:
    """Closed forms outside mean +- Z SE, and the z-scores of those compared."""
    bad, zs = [], []
    scale = 1.0 + expected_hetero("update_fro", *combo, params) + expected_hetero("adapter_output", *combo, params)
    for q, e in simulate_hetero(params, *combo, n_samples=SAMPLES, seed=seed).items():
        try:
            th = expected_hetero(q, *combo, params)
        except NoClosedForm:
            continue
        if abs(th) <= 1e-12 * scale:  # zero (up to the round-off of evaluating the mix sums)
            if abs(e.mean) > 1e-12 * scale:
                bad.append(f"{q} {combo}: closed form 0, MC {e.mean:.3g}")
            continue
        zs.append((e.mean - th) / e.se)
        if not e.contains(th, Z):
            bad.append(f"{q} {combo}: closed form {th:.6g}, MC {e.mean:.6g} +- {Z}*{e.se:.3g}")
    return bad, zs


BASE = HeteroParams(d=3, k=4, ranks=(1, 3, 2, 3), weights=(1.0, 2.0, 0.5, 1.5), gammas=(1.2, 0.7, 0.9, 0.5),
                    rho=0.3, s_A=0.7, s_B=1.1, s_dA=0.5, tau=0.9, eta=0.6, x_norm2=1.5, client=2)


@pytest.mark.parametrize("combo", COMBOS, ids=str)
def test_each_closed_form_at_a_fixed_mix(combo):
    bad, zs = _disagreements(BASE, combo, seed=11)
    assert bad == []
    assert zs  # something was compared


@st.composite
def models(draw: st.DrawFn) -> tuple[HeteroParams, tuple[str, str, str, str], int]:
    n = draw(st.integers(1, 4))
    ranks = tuple(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))
    floats = lambda lo, hi: st.floats(lo, hi)  # noqa: E731
    params = HeteroParams(
        d=draw(st.integers(1, 5)), k=draw(st.integers(1, 5)), ranks=ranks,
        weights=draw(st.none() | st.lists(floats(0.1, 5.0), min_size=n, max_size=n).map(tuple)),
        gammas=draw(st.none() | st.lists(floats(0.3, 2.0), min_size=n, max_size=n).map(tuple)),
        rho=draw(st.sampled_from([0.0, 1.0]) | floats(0.0, 1.0)), s_A=draw(floats(0.3, 2.0)),
        s_B=draw(floats(0.3, 2.0)), s_dA=draw(floats(0.3, 2.0)), tau=draw(floats(0.3, 2.0)),
        eta=draw(floats(0.3, 2.0)), x_norm2=draw(floats(0.5, 3.0)), client=draw(st.integers(0, n - 1)),
    )
    return params, draw(st.sampled_from(COMBOS)), draw(st.integers(0, 10**6))


@settings(derandomize=True, max_examples=150, deadline=None)
@given(models())
def test_closed_forms_agree_with_monte_carlo_over_random_mixes(case):
    params, combo, seed = case
    assert _disagreements(params, combo, seed)[0] == []


def _moment_at(params: HeteroParams, expr: sp.Expr) -> float:
    p = params.p
    return float(expr.subs({SYM.d: params.d, SYM.k: params.k, SYM.rho: params.rho, SYM.s_A: params.s_A,
                            SYM.s_B: params.s_B, SYM.s_dA: params.s_dA, SYM.X2: params.x_norm2,
                            SYM.gamma: 1.0, power_sum(2): float(np.sum(p**2))}))


def test_monte_carlo_rejects_plausible_wrong_formulas():
    # (a) the correlated part as a mean field (sum_i p_i g_i r_i)^2 / R instead of sum_l P_l^2
    p = HeteroParams(d=4, k=3, ranks=(1, 1, 6), weights=(1.0, 1.0, 2.0), rho=0.8, s_A=0.8)
    est = simulate_hetero(p, "zero-pad", "ffa", "adam", n_samples=SAMPLES, seed=3)["adapter_output"]
    right = expected_hetero("adapter_output", "zero-pad", "ffa", "adam", "shared", p)
    pw, r = p.p, np.asarray(p.ranks)
    k_fac = p.d * p.s_A**2 * p.s_B**2 * p.x_norm2
    wrong = k_fac * (p.rho * np.sum(pw * r) ** 2 / r.max() + (1 - p.rho) * np.sum(pw**2 * r))
    assert est.contains(right, Z) and not est.contains(wrong, Z)
    # (b) every client treated as rank R = max r_i (the homogeneous moment at r = R)
    at_max = _moment_at(p, closed_form("adapter_output", "ffa", "adam").subs(SYM.r, int(r.max())))
    assert not est.contains(at_max, Z)
    # (c) zero-padding a trained A taken as the exact sum (padding = stacking): misses the P_l^2 shrink
    p = HeteroParams(d=3, k=3, ranks=(1, 4), weights=(3.0, 1.0), rho=0.2, s_dA=0.3)
    est = simulate_hetero(p, "zero-pad", "fedit", "adam", n_samples=SAMPLES, seed=4)["adapter_output"]
    right = expected_hetero("adapter_output", "zero-pad", "fedit", "adam", "shared", p)
    wrong = expected_hetero("adapter_output", "stack", "fedit", "adam", "shared", p)
    assert est.contains(right, Z) and not est.contains(wrong, Z)


@pytest.mark.parametrize("mix", [(4, 16, 64), (4, 4, 4, 4, 64, 64), (2, 8, 8, 8, 8, 8, 8, 32)])
def test_aggregate_is_at_the_reference_under_the_derived_gamma_by_simulation(mix):
    alpha, rho = 2.0, 0.25
    ranks = tuple(r // 2 for r in mix)  # small sizes for the simulation, same shape of mix
    weights = tuple(1.0 + i % 3 for i in range(len(ranks)))
    reference = alpha**2 * 3 * 0.5**2 * 1.0  # one rank-1 client at gamma = alpha: d s_A^2 s_B^2 X2
    for rule, flat in (("sfed-hetero", True), ("rslora", False)):
        s = client_scaling_factors(rule, alpha, ranks, weights=weights, rho=rho)
        p = HeteroParams(d=3, k=4, ranks=ranks, weights=weights, gammas=s.clients, rho=rho, s_A=0.5)
        e = simulate_hetero(p, n_samples=SAMPLES, seed=len(mix), quantities=("adapter_output",))["adapter_output"]
        assert e.contains(reference * s.size**2, Z)
        assert e.contains(reference, Z) == flat


def _svd(params: HeteroParams, combo: tuple[str, str, str, str]) -> dict[str, Estimate]:
    return simulate_hetero(params, *combo, n_samples=4_000, seed=5)


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[0] == "svd"], ids=str)
def test_svd_download_without_closed_form_obeys_what_must_hold(combo):
    assert "download" in simulated_quantities(*combo)
    # a client whose rank reaches min(d, k) downloads the whole update
    full = HeteroParams(d=3, k=4, ranks=(1, 3), rho=0.3, client=1)
    est = _svd(full, combo)
    assert np.allclose(est["download"].samples, est["adapter_output"].samples, rtol=1e-9, atol=1e-12)
    # a rank-1 client keeps part of it, never more, and misses the rest
    part = HeteroParams(d=3, k=4, ranks=(1, 3), rho=0.3, client=0)
    est = _svd(part, combo)
    kept, whole = est["download"], est["adapter_output"]
    assert np.all(kept.samples <= whole.samples * (1 + 1e-9) + 1e-12)
    lost = whole.samples - kept.samples  # paired: the same draws
    assert lost.mean() > Z * lost.std(ddof=1) / np.sqrt(lost.size)
    assert est["download_gap"].mean > Z * est["download_gap"].se
