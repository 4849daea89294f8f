"""The derivation: closed forms, the solved gamma and its reductions, flatness under gamma*."""

from __future__ import annotations

import math

import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from sfed_theory import scaling_factor, weights_sum_squares
from sfed_theory.assumptions import REGIMES, SCHEMES, SYM, power_sum
from sfed_theory.derivation import C_N, closed_form, defined_combinations, derive, solve_invariance

S2, S3 = power_sum(2), power_sum(3)
C = SYM.rho + (1 - SYM.rho) * S2
SETTINGS = settings(derandomize=True, max_examples=200, deadline=None)


def test_canonical_moment_matches_theory_md():
    # THEORY.md: E||y||^2 = gamma^2 d r s_A^2 s_B^2 ||x||^2 (rho + (1 - rho)/N); here with S2 for 1/N.
    expected = SYM.gamma**2 * SYM.d * SYM.r * SYM.s_A**2 * SYM.s_B**2 * SYM.X2 * C
    assert sp.simplify(closed_form("adapter_output", "ffa", "adam") - expected) == 0


def test_every_combination_derives_with_inspectable_steps():
    combos = defined_combinations()
    # 4 quantities x 6 schemes x 3 regimes + 12 aggregation errors + 12 loss changes, and the client projections:
    # output_client and grad_A_client for ffa, fedit, fedit-indep x 3 regimes, grad_B_client and grad_B_increment
    # for fedit, fedit-indep x the 2 regimes where A trains; the update's shared part's output, refined regime only
    assert len(combos) == 96 + 2 * 9 + 2 * 4 + 6
    for q, s, r in combos:
        dv = derive(q, s, r)
        if (q, s) == ("grad_A", "exact"):  # the adapter restarts at B = 0: dL/dA has no terms at all
            assert not dv.terms and dv.result == 0
            continue
        assert dv.terms, (q, s, r)
        latex = dv.latex()
        assert r"\mathbb{E}[Q]" in latex and "Q =" in latex
        if dv.result != 0:
            assert dv.pairings and r"\langle" in latex


def test_solved_gamma_is_the_general_rule_and_reduces_to_sfed_and_rslora():
    inv = solve_invariance("ffa", "adam")
    a, r, n = SYM.alpha, SYM.r, SYM.N
    # gamma* > 0, so comparing squares is exact (sympy cannot tell sqrt(1/x) = 1/sqrt(x) without rho <= 1)
    assert sp.simplify(inv.gamma_star**2 - a**2 / (r * C)) == 0
    assert sp.simplify(inv.at_rho0_equal - a * sp.sqrt(n / r)) == 0
    assert sp.simplify(inv.at_one_client - a / sp.sqrt(r)) == 0
    assert sp.simplify(inv.at_rho1 - a / sp.sqrt(r)) == 0
    assert len(inv.roots) == 2  # +-gamma; the negative one is discarded


_GAMMA_STAR = sp.lambdify((SYM.alpha, SYM.r, SYM.rho, S2), solve_invariance("ffa", "adam").gamma_star, "math")


@SETTINGS
@given(
    st.floats(0.1, 100.0),
    st.integers(1, 4096),
    st.integers(1, 256),
    st.floats(0.0, 1.0),
    st.data(),
)
def test_solved_gamma_equals_rules_scaling_factor(alpha, r, n, rho, data):
    k = data.draw(st.integers(1, n))
    derived = _GAMMA_STAR(alpha, r, rho, 1.0 / k)
    rule = scaling_factor("sfed-general", alpha, r, n, rho=rho, participating=k)
    assert derived == pytest.approx(rule, rel=1e-12)
    if rho == 0.0 and k == n:
        assert derived == pytest.approx(scaling_factor("sfed", alpha, r, n), rel=1e-12)
    if n == 1 or rho == 1.0:
        assert derived == pytest.approx(scaling_factor("rslora", alpha, r, n), rel=1e-12)


@SETTINGS
@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=12), st.floats(0.0, 1.0), st.integers(1, 512))
def test_solved_gamma_with_unequal_weights_equals_rule(weights, rho, r):
    derived = _GAMMA_STAR(16.0, r, rho, weights_sum_squares(weights))
    rule = scaling_factor("sfed-general", 16.0, r, len(weights), rho=rho, weights=weights)
    assert derived == pytest.approx(rule, rel=1e-12)


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_moment_is_flat_in_r_and_clients_under_its_solved_gamma(scheme, regime):
    inv = solve_invariance(scheme, regime)
    q = closed_form("adapter_output", scheme, regime).subs(SYM.gamma, inv.gamma_star) / SYM.d
    for var in (SYM.r, S2, S3, SYM.N):
        assert sp.simplify(sp.diff(q, var)) == 0, (scheme, regime, var)
    # and it is not flat under a gamma that ignores r (the condition has content)
    assert sp.simplify(sp.diff(closed_form("adapter_output", scheme, regime).subs(SYM.gamma, SYM.alpha), SYM.r)) != 0


def test_sgd_law_differs_from_adam_law():
    # Under SGD the increment carries gamma, so E||y||^2 ~ gamma^4 and gamma* ~ (N / (r (k + r + 1)))^(1/4).
    inv = solve_invariance("ffa", "sgd")
    n, r, k, a = SYM.N, SYM.r, SYM.k, SYM.alpha
    assert sp.simplify(inv.at_rho0_equal - a * ((k + 2) * n / (r * (k + r + 1))) ** sp.Rational(1, 4)) == 0
    assert sp.simplify(inv.at_rho0_equal - solve_invariance("ffa", "adam").at_rho0_equal) != 0


def test_sgd_loss_change_and_update_norm_scale_differently_in_rank():
    # rsLoRA's gamma^2 = alpha^2 / r makes the first-order loss change flat in r but not ||dW||_F.
    rs = {SYM.gamma: SYM.alpha / sp.sqrt(SYM.r)}
    loss = closed_form("loss_change", "ffa", "sgd").subs(rs)
    fro2 = closed_form("update_fro", "ffa", "sgd").subs(rs)
    assert not loss.has(SYM.r)
    assert fro2.has(SYM.r)
    # the Wishart factor: E||dW||^2 / E<G,dW>^2 grows like (k + r + 1) / r, i.e. not in a fixed ratio
    ratio = sp.simplify(fro2 / loss**2)
    assert sp.simplify(ratio.subs(SYM.r, 2 * SYM.r) / ratio - 1) != 0


def test_fedit_aggregation_error_vanishes_exactly_when_it_should():
    err = closed_form("aggregation_error", "fedit", "adam")
    assert err != 0
    assert sp.simplify(err.subs({S2: 1, S3: 1})) == 0  # one client
    assert sp.simplify(err.subs(SYM.rho, 1)) == 0  # identical clients
    assert err.has(SYM.s_dA) and sp.simplify(err.subs(SYM.s_dA, 0)) == 0  # A does not move
    for scheme in ("ffa", "exact"):
        assert closed_form("aggregation_error", scheme, "adam") == 0
    n = SYM.N
    equal = sp.simplify(err.subs({S2: 1 / n, S3: 1 / n**2}))
    assert sp.simplify(equal - SYM.gamma**2 * SYM.d * SYM.k * SYM.r * SYM.s_B**2 * SYM.s_dA**2
                       * (1 - SYM.rho) ** 2 * (n - 1) / n**2) == 0


def test_unknown_names_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown quantity"):
        derive("nope", "ffa", "adam")
    with pytest.raises(ValueError, match="unknown scheme.*allowed"):
        derive("update_fro", "fedavg", "adam")
    with pytest.raises(ValueError, match="unknown regime"):
        derive("update_fro", "ffa", "adamw")
    with pytest.raises(ValueError, match="sgd"):
        derive("loss_change", "ffa", "adam")
    with pytest.raises(ValueError, match="FedSA"):
        derive("aggregation_error", "fedsa", "adam")


def test_gamma_reference_is_positive_real():
    for scheme in SCHEMES:
        for regime in REGIMES:
            g = solve_invariance(scheme, regime).gamma_star
            val = g.subs({s: 0.5 for s in g.free_symbols}).evalf()
            assert val.is_real and float(val) > 0 and math.isfinite(float(val))


def test_sgd_loss_change_invariance_recovers_sfed():
    """Under SGD the first-order loss change, not the output norm, is what sqrt(N/r) keeps flat."""
    inv = solve_invariance("ffa", "sgd", "loss_change")
    assert inv.power == 2
    assert sp.simplify(inv.at_rho0_equal - SYM.alpha * sp.sqrt(SYM.N / SYM.r)) == 0
    assert sp.simplify(inv.at_one_client - SYM.alpha / sp.sqrt(SYM.r)) == 0
    out = solve_invariance("ffa", "sgd", "adapter_output")
    assert out.power == 4
    assert sp.simplify(out.readable() - SYM.alpha**4 * (SYM.k + 2) / (C_N * SYM.r * (SYM.k + SYM.r + 1))) == 0


def test_independent_a_inits_collapse_faster_than_one_broadcast_a():
    """FedIT with one broadcast A init: the output moment falls like S2 (1/N at rho = 0); with every
    client's own A init averaged by the server, the init part of Abar shrinks too: like S2^2."""
    from sfed_theory.assumptions import SYM, power_sum

    s2 = power_sum(2)
    shared = closed_form("adapter_output", "fedit", "adam")
    own = closed_form("adapter_output", "fedit-indep", "adam")
    at = {SYM.rho: 0, SYM.s_dA: 0}
    assert sp.simplify(shared.subs(at) / own.subs(at) - 1 / s2) == 0
    # one client (S_m = 1): nothing is averaged, the two inits agree
    assert sp.simplify((shared - own).subs({power_sum(m): 1 for m in (2, 3, 4)})) == 0
    # identical increments (rho = 1) do not make independent inits identical: A's init still averages
    assert sp.simplify((shared - own).subs({SYM.rho: 1})) != 0


@pytest.mark.parametrize("scheme", ["ffa", "fedit", "fedsa"])
@pytest.mark.parametrize("quantity", ["adapter_output", "grad_A", "grad_B", "loss_change"])
def test_refined_forms_keep_the_gradient_side_and_the_token_side_apart(quantity, scheme):
    """The gradients live on the probe gradient's side (its direction z and token bulk nu_g), the output on the
    tokens' (their spike x and bulk nu); the two meet only through B's coherent part u (A z)^T reaching the
    output, at the angle kappa = cos(x, z), which enters in even powers (its sign is an eigenvector's arbitrary
    sign). The first-order loss change <g z^T, dW> sees neither bulk nor the spike."""
    form = sp.expand(closed_form(quantity, scheme, "adam-refined"))
    output = quantity == "adapter_output"
    assert form.has(SYM.kappa) == output and form.has(SYM.nu) == output
    assert form.has(SYM.nu_g) == quantity.startswith("grad")
    if output:
        assert all(m[0] % 2 == 0 for m in sp.Poly(form, SYM.kappa).monoms())
    assert not closed_form("update_fro", scheme, "adam-refined").has(SYM.kappa)


def test_output_grows_like_r_squared_only_when_the_gradient_direction_meets_the_spike():
    """By hand: B's coherent part u (A z)^T reaches the output through z^T A^T A x, whose second moment is
    s_A^4 X2^2 r (1 + kappa^2 + r kappa^2) (tests/test_theory_engine.py): the r^2 term needs kappa > 0. With
    nu = 0 the FFA output is then linear in r at kappa = 0 and quadratic at kappa = 1."""
    form = closed_form("adapter_output", "ffa", "adam-refined").subs(SYM.nu, 0)
    assert sp.degree(sp.expand(form.subs(SYM.kappa, 0)), SYM.r) == 1
    assert sp.degree(sp.expand(form.subs(SYM.kappa, 1)), SYM.r) == 2
