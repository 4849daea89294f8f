"""The prediction interface used by the validation harness."""

from __future__ import annotations

import math

import pytest

from sfed_theory import predicted_exponent, predicted_norm, scaling_factor
from sfed_theory.montecarlo import ModelParams, simulate

Z = 5.0


@pytest.mark.parametrize(
    ("quantity", "rule", "scheme", "regime"),
    [
        ("adapter_output", "sfed", "ffa", "adam"),
        ("update_fro", "rslora", "fedit", "adam"),
        ("grad_A", "lora", "fedsa", "sgd"),
        ("grad_B", "sfed-general", "exact", "adam"),
        ("adapter_output", "sfed-general", "exact", "sgd"),
    ],
)
def test_predicted_norm_matches_simulation_with_default_conventions(quantity, rule, scheme, regime):
    # defaults: s_A = 1/sqrt(k), ||x||^2 = k, s_dA = s_B; gamma from the rule at K clients averaged
    r, n, k, d, rho, part = 3, 5, 6, 4, 0.2, 3
    kw = dict(rho=rho, participating=part) if rule == "sfed-general" else {}
    pred = predicted_norm(quantity, rule, regime=regime, scheme=scheme, rank=r, n_clients=n, alpha=2.0, rho=rho,
                          participating=part, d=d, k=k, s_B=0.3, tau=0.7, eta=0.05)
    gamma = scaling_factor(rule, 2.0, r, n, **kw) if kw else scaling_factor(rule, 2.0, r, part)  # at K, as the harness
    p = ModelParams(d=d, k=k, r=r, n_clients=n, gamma=gamma, rho=rho,
                    participating=part, s_A=1 / math.sqrt(k), s_B=0.3, s_dA=0.3, tau=0.7, eta=0.05, x_norm2=k)
    est = simulate(p, scheme, regime, n_samples=20_000, seed=9, quantities=(quantity,))[quantity]
    assert est.contains(pred**2, Z)


def test_exponents_in_rank_and_clients_adam_ffa():
    ranks, clients = [4, 8, 16, 64], [1, 2, 4, 16]
    slope = lambda rule, wrt, **kw: predicted_exponent(  # noqa: E731
        "adapter_output", rule, wrt=wrt, ranks=ranks if wrt == "rank" else 8,
        n_clients=clients if wrt == "n_clients" else 4, **kw)
    assert slope("lora", "rank") == pytest.approx(-0.5)
    assert slope("rslora", "rank") == pytest.approx(0.0, abs=1e-12)
    assert slope("sfed", "rank") == pytest.approx(0.0, abs=1e-12)
    assert slope("rslora", "n_clients") == pytest.approx(-0.5)  # the collapse with N
    assert slope("sfed", "n_clients") == pytest.approx(0.0, abs=1e-12)
    assert slope("sfed", "n_clients", rho=1.0) == pytest.approx(0.5)  # identical clients: sfed over-scales
    assert slope("sfed-general", "n_clients", rho=0.3) == pytest.approx(0.0, abs=1e-12)


def test_exponent_sgd_regime_is_a_different_law():
    ranks = [4, 8, 16, 32]
    # SGD: ||y|| ~ gamma^2 sqrt(c_N r (k + r + 1)); sfed gives N^(1/2) growth in N
    assert predicted_exponent("adapter_output", "sfed", wrt="n_clients", ranks=8, n_clients=[1, 2, 4, 8],
                              regime="sgd") == pytest.approx(0.5)
    s = predicted_exponent("adapter_output", "rslora", wrt="rank", ranks=ranks, n_clients=1, regime="sgd", k=10**6)
    assert s == pytest.approx(-0.5, abs=1e-3)  # r << k: sqrt((k + r + 1)/r)


def test_paired_grid_gives_partial_slope():
    ranks, clients = [4, 8, 4, 8], [1, 1, 4, 4]
    assert predicted_exponent("adapter_output", "lora", wrt="rank", ranks=ranks, n_clients=clients) == \
        pytest.approx(-0.5)
    assert predicted_exponent("adapter_output", "lora", wrt="n_clients", ranks=ranks, n_clients=clients) == \
        pytest.approx(-0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(quantity="loss"), "unknown quantity.*allowed"),
        (dict(rule="qlora"), "unknown rule"),
        (dict(regime="adamw"), "unknown regime.*adam, adam-refined, sgd"),
        (dict(scheme="fedavg"), "unknown scheme"),
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(rank=2.5), "rank"),
        (dict(n_clients=0), "n_clients"),
        (dict(participating=9), "exceeds n_clients"),
        (dict(rho=1.5), r"rho .* \[-1, 1\]"),
        (dict(regime="adam-refined", f_in=1.2), r"f_in is a share and must lie in \[0, 1\]"),
        (dict(regime="adam-refined", kappa=-0.1), r"kappa is a cosine's size and must lie in \[0, 1\]"),
        (dict(regime="adam-refined", nu_g=-0.5), r"nu_g is an input variance"),
        (dict(s_A=-1.0), "s_A"),
        (dict(x_norm2=float("nan")), "x_norm2"),
        (dict(alpha=0.0), "alpha must be > 0"),
        (dict(quantity="aggregation_error", scheme="fedsa"), "FedSA"),
    ],
)
def test_predicted_norm_bad_input(kwargs, match):
    args = dict(quantity="adapter_output", rule="sfed", rank=4, n_clients=4)
    args.update(kwargs)
    q, rule = args.pop("quantity"), args.pop("rule")
    assert isinstance(q, str) and isinstance(rule, str)
    with pytest.raises(ValueError, match=match):
        predicted_norm(q, rule, **args)


def test_predicted_exponent_bad_input():
    with pytest.raises(ValueError, match="wrt must be"):
        predicted_exponent("update_fro", "sfed", wrt="alpha", ranks=[1, 2], n_clients=2)
    with pytest.raises(ValueError, match="two distinct values"):
        predicted_exponent("update_fro", "sfed", wrt="rank", ranks=[4, 4], n_clients=2)
    with pytest.raises(ValueError, match="collinear"):
        predicted_exponent("update_fro", "sfed", wrt="rank", ranks=[2, 4, 8], n_clients=[1, 2, 4])
    with pytest.raises(ValueError, match="equal length"):
        predicted_exponent("update_fro", "sfed", wrt="rank", ranks=[2, 4, 8], n_clients=[1, 2])


@pytest.mark.parametrize(
    ("args", "kw", "match"),
    [
        (("sfed-x", 16, 8, 4), {}, "unknown rule.*allowed rules"),
        (("sfed", 16, 0, 4), {}, "rank must be an integer >= 1"),
        (("sfed", float("inf"), 8, 4), {}, "alpha must be finite"),
        (("rslora", 16, 8, 4), {"rho": 0.1}, "takes no extra arguments"),
        (("sfed-general", 16, 8, 4), {"rho": -0.1}, r"rho .* \[0, 1\]"),
        (("sfed-general", 16, 8, 4), {"participating": 5}, "exceeds n_clients"),
    ],
)
def test_scaling_factor_bad_input_is_clear(args, kw, match):
    with pytest.raises(ValueError, match=match):
        scaling_factor(*args, **kw)
