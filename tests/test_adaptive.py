"""Tests of the rho / N_eff estimator, the adaptive controller and the function-preserving rescale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sfed_theory.rules import effective_clients, scaling_factor
from validation.adaptive import (
    AdaptiveScaler,
    estimate_rho,
    estimate_rho_from_gram,
    rescale_for_new_gamma,
    rho_standard_error,
)

P = 4096
FAST = settings(derandomize=True, max_examples=25, deadline=None)


def synth(rng: np.random.Generator, n: int, p: int, rho: float) -> np.ndarray:
    """x_i = sqrt(rho) z + sqrt(1 - rho) e_i: entries N(0, 1), correlation rho across clients."""
    z = rng.standard_normal(p)
    e = rng.standard_normal((n, p))
    return math.sqrt(rho) * z + math.sqrt(1.0 - rho) * e


def tolerance(rho: float, n: int, p: int, k: float = 5.0) -> float:
    """k standard errors plus the O(1/P) bias (|bias| <= rho (1 - rho^2) / P, measured in the bench)."""
    return k * rho_standard_error(rho, n, p) + rho * (1 - rho**2) / p + 1e-12


# ---------------------------------------------------------------- known rho
@FAST
@given(
    rho=st.floats(0.0, 0.95),
    n=st.integers(2, 16),
    seed=st.integers(0, 2**31 - 1),
    method=st.sampled_from(["ratio", "cosine"]),
)
def test_recovers_known_rho(rho: float, n: int, seed: int, method: str) -> None:
    x = synth(np.random.default_rng(seed), n, P, rho)
    est = estimate_rho(x, method=method)
    assert est.defined and est.n_used == n and est.excluded == ()
    assert abs(est.rho_raw - rho) <= tolerance(rho, n, P), (est, rho_standard_error(rho, n, P))
    assert 0.0 <= est.rho <= 1.0
    assert est.n_eff == pytest.approx(effective_clients(n, rho=est.rho))


def test_standard_error_formula_matches_monte_carlo() -> None:
    """The analytic se (and the block-jackknife se) match the empirical sd over repeats."""
    rng = np.random.default_rng(7)
    n, p, rho, reps = 4, 1024, 0.5, 300
    ests, jack = [], []
    for _ in range(reps):
        e = estimate_rho(synth(rng, n, p, rho))
        ests.append(e.rho_raw)
        jack.append(e.se)
    sd = float(np.std(ests, ddof=1))
    se = rho_standard_error(rho, n, p)
    # sd of a sample sd with 300 draws is ~4%; 15% is a loose but falsifiable band
    assert sd == pytest.approx(se, rel=0.15)
    assert float(np.mean(jack)) == pytest.approx(se, rel=0.2)
    assert abs(np.mean(ests) - rho) < 4 * sd / math.sqrt(reps) + rho * (1 - rho**2) / p


def test_jackknife_se_sees_correlated_entries() -> None:
    """Entries repeated 16x (P_eff = P/16): the analytic se with P is 4x too small, the jackknife is not."""
    rng = np.random.default_rng(3)
    x = np.repeat(synth(rng, 4, 256, 0.3), 16, axis=1)
    e = estimate_rho(x)
    assert e.se > 2.5 * e.se_analytic
    assert e.se == pytest.approx(rho_standard_error(e.rho, 4, 256), rel=0.6)


def test_exact_limits() -> None:
    z = np.random.default_rng(0).standard_normal(100)
    same = np.stack([z, z, z])
    for m in ("ratio", "cosine"):
        assert estimate_rho(same, method=m).rho == pytest.approx(1.0)
        assert estimate_rho(same, method=m).n_eff == pytest.approx(1.0)
    orth = np.eye(3, 10)
    for m in ("ratio", "cosine"):
        e = estimate_rho(orth, method=m)
        assert e.rho == 0.0 and e.n_eff == pytest.approx(3.0)


def test_ratio_n_eff_is_measured_shrinkage() -> None:
    """1/(rho_raw + (1 - rho_raw)/N) == mean_i ||x_i||^2 / ||mean_i x_i||^2, for any data."""
    rng = np.random.default_rng(11)
    x = synth(rng, 6, 500, 0.4) * rng.uniform(0.2, 3.0, size=(6, 1))
    e = estimate_rho(x)
    implied = 1.0 / (e.rho_raw + (1 - e.rho_raw) / 6)
    measured = float(np.mean(np.sum(x**2, axis=1)) / np.sum(x.mean(axis=0) ** 2))
    assert implied == pytest.approx(measured, rel=1e-10)


# ---------------------------------------------------------------- invariances
@FAST
@given(c=st.floats(1e-6, 1e6), seed=st.integers(0, 10_000), method=st.sampled_from(["ratio", "cosine"]))
def test_scale_invariance(c: float, seed: int, method: str) -> None:
    x = synth(np.random.default_rng(seed), 5, 300, 0.3)
    assert estimate_rho(c * x, method=method).rho_raw == pytest.approx(estimate_rho(x, method=method).rho_raw, abs=1e-10)


def test_cosine_per_client_scale_invariance_and_ratio_not() -> None:
    rng = np.random.default_rng(5)
    x = synth(rng, 5, 2000, 0.5)
    s = np.array([[0.1], [1.0], [3.0], [0.5], [10.0]])
    assert estimate_rho(x * s, method="cosine").rho_raw == pytest.approx(estimate_rho(x, method="cosine").rho_raw, abs=1e-12)
    # unequal norms count as extra shrinkage for the ratio estimator (Cauchy-Schwarz: it goes down)
    assert estimate_rho(x * s, method="ratio").rho_raw < estimate_rho(x, method="ratio").rho_raw - 0.1


def test_permutation_invariance_with_weights() -> None:
    rng = np.random.default_rng(6)
    x = synth(rng, 6, 400, 0.2)
    w = rng.uniform(0.5, 3, 6)
    perm = rng.permutation(6)
    for m in ("ratio", "cosine"):
        a = estimate_rho(x, w, method=m)
        b = estimate_rho(x[perm], w[perm], method=m)
        assert a.rho_raw == pytest.approx(b.rho_raw, abs=1e-12)
        assert a.n_eff == pytest.approx(b.n_eff, rel=1e-12)


def test_torch_matches_numpy() -> None:
    x = synth(np.random.default_rng(8), 4, 300, 0.6)
    for m in ("ratio", "cosine"):
        a = estimate_rho(x, method=m)
        b = estimate_rho(torch.tensor(x, dtype=torch.float32).reshape(4, 20, 15), method=m)
        assert b.rho_raw == pytest.approx(a.rho_raw, abs=1e-5)
        assert b.n_entries == 300


# ---------------------------------------------------------------- weights
def test_equal_weights_equal_unweighted() -> None:
    x = synth(np.random.default_rng(9), 5, 300, 0.3)
    for m in ("ratio", "cosine"):
        assert estimate_rho(x, [2.0] * 5, method=m).rho_raw == pytest.approx(estimate_rho(x, method=m).rho_raw, abs=1e-12)


@FAST
@given(
    rho=st.floats(0.0, 0.9),
    n=st.integers(2, 10),
    seed=st.integers(0, 2**31 - 1),
    method=st.sampled_from(["ratio", "cosine"]),
)
def test_weighted_recovers_known_rho(rho: float, n: int, seed: int, method: str) -> None:
    rng = np.random.default_rng(seed)
    x = synth(rng, n, P, rho)
    w = rng.uniform(0.5, 2.0, n)  # bounded weight ratio: se inflates by at most a small factor
    est = estimate_rho(x, w, method=method)
    assert abs(est.rho_raw - rho) <= 2 * tolerance(rho, n, P)
    assert est.n_eff == pytest.approx(effective_clients(n, rho=est.rho, weights=w))
    assert est.n_eff <= effective_clients(n, rho=est.rho) + 1e-12  # unequal weights never raise N_eff


def test_zero_weight_excludes_client() -> None:
    x = synth(np.random.default_rng(10), 5, 300, 0.3)
    w = np.array([1.0, 2.0, 0.0, 1.0, 3.0])
    keep = [0, 1, 3, 4]
    a = estimate_rho(x, w)
    b = estimate_rho(x[keep], w[keep])
    assert a.excluded == (2,) and a.n_used == 4
    assert a.rho_raw == pytest.approx(b.rho_raw, abs=1e-12)
    assert a.n_eff == pytest.approx(b.n_eff, rel=1e-12)
    assert a.used_weight_fraction == 1.0


# ---------------------------------------------------------------- robustness
def test_single_client_is_undefined_not_an_error() -> None:
    e = estimate_rho(np.ones((1, 10)))
    assert not e.defined and math.isnan(e.rho) and math.isnan(e.rho_raw)
    assert e.n_eff == 1.0 and e.n_used == 1


def test_zero_increment_client_is_excluded() -> None:
    rng = np.random.default_rng(12)
    x = synth(rng, 5, 1000, 0.4)
    x0 = x.copy()
    x0[1] = 0.0
    e = estimate_rho(x0)
    assert e.excluded == (1,) and e.n_used == 4 and e.n_clients == 5
    assert e.rho_raw == pytest.approx(estimate_rho(x[[0, 2, 3, 4]]).rho_raw, abs=1e-12)
    assert e.used_weight_fraction == pytest.approx(0.8)
    assert math.isfinite(e.se)
    for m in ("ratio", "cosine"):
        assert math.isfinite(estimate_rho(x0, method=m).rho_raw)


def test_all_zero_and_one_nonzero() -> None:
    e = estimate_rho(np.zeros((3, 8)))
    assert e.n_used == 0 and math.isnan(e.n_eff) and not e.defined
    x = np.zeros((3, 8))
    x[2, 0] = 1.0
    e = estimate_rho(x)
    assert e.n_used == 1 and e.excluded == (0, 1) and e.n_eff == 1.0 and not e.defined


def test_negative_raw_is_reported_then_clipped() -> None:
    z = np.random.default_rng(1).standard_normal(50)
    e = estimate_rho(np.stack([z, -z]))
    assert e.rho_raw == pytest.approx(-1.0)
    assert e.rho == 0.0 and e.n_eff == pytest.approx(2.0)


def test_jackknife_with_client_zero_in_one_block() -> None:
    """A client whose increment lives in one block only: the replicate without that block is skipped."""
    x = synth(np.random.default_rng(2), 3, 64, 0.5)
    x[0, 4:] = 0.0  # client 0 nonzero only in the first block of 16
    e = estimate_rho(x, n_blocks=16)
    assert math.isfinite(e.rho_raw) and (math.isnan(e.se) or e.se >= 0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.array([[1.0, np.nan], [1.0, 2.0]]), "non-finite"),
        (np.array([[1.0, np.inf], [1.0, 2.0]]), "non-finite"),
        (torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), "non-finite"),
        (np.ones(5), "shape"),
        (np.ones((3, 0)), "no entries"),
        (np.ones((0, 4)), "no clients"),
        (np.array([[1 + 1j, 0], [0, 1]]), "real"),
    ],
)
def test_bad_increments(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        estimate_rho(bad)


def test_bad_arguments() -> None:
    x = np.ones((3, 4))
    with pytest.raises(ValueError, match="method"):
        estimate_rho(x, method="pearson")
    with pytest.raises(ValueError, match="weights has 2 entries"):
        estimate_rho(x, [1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        estimate_rho(x, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        estimate_rho(x, [1.0, np.nan, 1.0])
    with pytest.raises(ValueError, match="n_blocks"):
        estimate_rho(x, n_blocks=0)
    with pytest.raises(ValueError, match="square"):
        estimate_rho_from_gram(np.ones((2, 3)))
    with pytest.raises(ValueError, match="negative diagonal"):
        estimate_rho_from_gram(np.array([[-1.0, 0.0], [0.0, 1.0]]))


def test_gram_route_equals_direct_and_adds_over_layers() -> None:
    rng = np.random.default_rng(13)
    a, b = synth(rng, 4, 300, 0.5), synth(rng, 4, 200, 0.5)
    direct = estimate_rho(np.concatenate([a, b], axis=1))
    via = estimate_rho_from_gram(a @ a.T + b @ b.T, n_entries=500)
    assert via.rho_raw == pytest.approx(direct.rho_raw, abs=1e-12)


# ---------------------------------------------------------------- controller
def test_controller_starts_at_paper_gamma() -> None:
    s = AdaptiveScaler(alpha=16, rank=64)
    assert s.gamma(8) == pytest.approx(scaling_factor("sfed", 16, 64, 8))
    assert AdaptiveScaler(alpha=16, rank=64, prior_rho=1.0).gamma(8) == pytest.approx(scaling_factor("rslora", 16, 64))


@pytest.mark.parametrize("rho, n", [(0.0, 8), (0.3, 8), (0.7, 4), (0.5, 2)])
def test_controller_converges_to_general_gamma(rho: float, n: int) -> None:
    rng = np.random.default_rng(int(rho * 100) + n)
    s = AdaptiveScaler(alpha=16, rank=32, ema=0.3)
    for _ in range(40):
        g = s.update(synth(rng, n, P, rho))
    target = scaling_factor("sfed-general", 16, 32, n, rho=rho)
    # (1 - 0.3)^40 ~ 6e-7 of the prior gap left; the remaining error is estimator noise
    rho_tol = 3 * rho_standard_error(rho, n, P) + 1e-3
    lo = scaling_factor("sfed-general", 16, 32, n, rho=min(1.0, rho + rho_tol))
    hi = scaling_factor("sfed-general", 16, 32, n, rho=max(0.0, rho - rho_tol))
    assert lo - 1e-12 <= g <= hi + 1e-12, (g, target)
    assert s.rho_smoothed == pytest.approx(rho, abs=rho_tol)
    assert len(s.history) == 40 and s.history[-1].gamma == g
    if rho > 0:  # actually moved away from the prior's gamma
        assert g < scaling_factor("sfed", 16, 32, n) * 0.99


def test_controller_holds_state_on_single_client_round() -> None:
    rng = np.random.default_rng(1)
    s = AdaptiveScaler(alpha=8, rank=16, ema=0.5)
    s.update(synth(rng, 4, P, 0.5))
    before = s.rho_smoothed
    g = s.update(synth(rng, 1, P, 0.5))
    assert s.rho_smoothed == before and s.history[-1].step == 0.0
    assert g == pytest.approx(8 / math.sqrt(16))  # one client next round: N_eff = 1 (rsLoRA)


def test_controller_shrinks_noisy_rounds_more() -> None:
    """Same raw estimate, larger se -> smaller step towards it."""
    s1 = AdaptiveScaler(alpha=1, rank=1, ema=0.5, tau=0.05)
    s2 = AdaptiveScaler(alpha=1, rank=1, ema=0.5, tau=0.05)
    g = np.array([[1.0, 0.5], [0.5, 1.0]])  # rho_hat = 0.5
    from validation.adaptive import RhoEstimate

    base = estimate_rho_from_gram(g)
    precise = RhoEstimate(**{**base.__dict__, "se": 0.001})
    noisy = RhoEstimate(**{**base.__dict__, "se": 0.2})
    s1.observe(precise)
    s2.observe(noisy)
    assert s1.history[-1].step == pytest.approx(0.5 / (1 + 0.02**2))
    assert s2.history[-1].step == pytest.approx(0.5 / (1 + 16))
    assert s1.rho_smoothed > s2.rho_smoothed > 0


def test_controller_weights() -> None:
    rng = np.random.default_rng(4)
    w = np.array([1.0, 1.0, 2.0, 4.0])
    s = AdaptiveScaler(alpha=16, rank=32, ema=1.0, tau=math.inf)
    g = s.update(synth(rng, 4, P, 0.2), w)
    assert g == pytest.approx(scaling_factor("sfed-general", 16, 32, 4, rho=s.rho_smoothed, weights=w))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"alpha": 0, "rank": 4}, "alpha"),
        ({"alpha": 1, "rank": 0}, "rank"),
        ({"alpha": 1, "rank": 2.5}, "rank"),
        ({"alpha": 1, "rank": 4, "prior_rho": 1.5}, "prior_rho"),
        ({"alpha": 1, "rank": 4, "ema": 0.0}, "ema"),
        ({"alpha": 1, "rank": 4, "tau": -1}, "tau"),
        ({"alpha": 1, "rank": 4, "method": "x"}, "method"),
    ],
)
def test_controller_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdaptiveScaler(**kw)


# ---------------------------------------------------------------- rescale
@FAST
@given(
    g_old=st.floats(1e-3, 1e3),
    g_new=st.floats(1e-3, 1e3),
    seed=st.integers(0, 10_000),
)
def test_rescale_preserves_product(g_old: float, g_new: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((4, 12))
    B = rng.standard_normal((9, 4))
    B2 = rescale_for_new_gamma(B, g_old, g_new)
    np.testing.assert_allclose(g_new * B2 @ A, g_old * B @ A, rtol=1e-10, atol=1e-12 * abs(g_old))
    assert not np.shares_memory(B2, B)


def test_rescale_torch_inplace_parameter_and_exact_scheme() -> None:
    torch.manual_seed(0)
    A = torch.randn(4, 12, dtype=torch.float64)
    B = torch.nn.Parameter(torch.randn(9, 4, dtype=torch.float64))
    before = 2.0 * (B.detach() @ A)
    out = rescale_for_new_gamma(B, 2.0, 5.0, inplace=True)
    assert out is B and B.requires_grad
    torch.testing.assert_close(5.0 * (B.detach() @ A), before)
    # exact scheme: merged into W0, adapter restarted at zero -> nothing changes
    zero = np.zeros((9, 4))
    assert np.array_equal(rescale_for_new_gamma(zero, 2.0, 5.0), zero)


@pytest.mark.parametrize("g_old, g_new", [(0.0, 1.0), (1.0, -1.0), (math.nan, 1.0), (1.0, math.inf), ("a", 1.0)])
def test_rescale_bad_gamma(g_old: object, g_new: object) -> None:
    with pytest.raises(ValueError, match="g_old|g_new"):
        rescale_for_new_gamma(np.ones((2, 2)), g_old, g_new)  # type: ignore[arg-type]


def test_controller_smooths_raw_not_clipped_estimates() -> None:
    """At rho = 0 half the raw estimates are negative; smoothing clipped values would bias rho up.

    N = 2, P = 64: se = 0.125, so EMA of clipped values sits near 0.4 * se = 0.05; EMA (0.1) of raw
    values has sd 0.125 * sqrt(0.1 / 1.9) = 0.029 and a clipped mean near 0.011.
    """
    rng = np.random.default_rng(21)
    s = AdaptiveScaler(alpha=1, rank=1, ema=0.1, tau=math.inf)
    vals = []
    for t in range(400):
        s.update(synth(rng, 2, 64, 0.0))
        if t >= 100:
            vals.append(s.rho_smoothed)
    assert float(np.mean(vals)) < 0.025
    assert min(h.rho_raw for h in s.history) < 0 < max(h.rho_raw for h in s.history)
