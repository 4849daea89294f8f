"""The public scaling-rule API: values, reductions between rules, and errors on bad input."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfed_theory import effective_clients, scaling_factor

alphas = st.floats(min_value=0.01, max_value=1e3, allow_nan=False)
ranks = st.integers(min_value=1, max_value=4096)
clients = st.integers(min_value=1, max_value=1024)
rhos = st.floats(min_value=0.0, max_value=1.0)

SETTINGS = settings(derandomize=True, max_examples=200, deadline=None)


def test_documented_example_16_clients_rank_256():
    assert scaling_factor("sfed", alpha=16, rank=256, n_clients=16) == pytest.approx(4.0)
    assert scaling_factor("lora", alpha=16, rank=256, n_clients=16) == pytest.approx(1 / 16)
    assert scaling_factor("rslora", alpha=16, rank=256, n_clients=16) == pytest.approx(1.0)


@SETTINGS
@given(alphas, ranks, clients)
def test_rule_ratios(alpha, r, n):
    lora = scaling_factor("lora", alpha, r, n)
    rs = scaling_factor("rslora", alpha, r, n)
    sfed = scaling_factor("sfed", alpha, r, n)
    assert rs / lora == pytest.approx(math.sqrt(r))
    assert sfed / rs == pytest.approx(math.sqrt(n))


@SETTINGS
@given(alphas, ranks, clients)
def test_general_reduces_to_sfed_at_rho_zero(alpha, r, n):
    assert scaling_factor("sfed-general", alpha, r, n, rho=0.0) == pytest.approx(scaling_factor("sfed", alpha, r, n))
    # equal explicit weights are the same as no weights
    assert scaling_factor("sfed-general", alpha, r, n, weights=[3.0] * n) == pytest.approx(
        scaling_factor("sfed", alpha, r, n)
    )


@SETTINGS
@given(alphas, ranks, clients, rhos)
def test_general_reduces_to_rslora_at_one_client_or_full_correlation(alpha, r, n, rho):
    rs = scaling_factor("rslora", alpha, r, n)
    assert scaling_factor("sfed-general", alpha, r, 1, rho=rho) == pytest.approx(rs)
    assert scaling_factor("sfed-general", alpha, r, n, rho=1.0) == pytest.approx(rs)


@SETTINGS
@given(alphas, ranks, clients, rhos, st.data())
def test_general_is_bracketed_and_monotone(alpha, r, n, rho, data):
    """rsLoRA <= general <= SFed, and more correlation means a smaller correction."""
    g = scaling_factor("sfed-general", alpha, r, n, rho=rho)
    assert scaling_factor("rslora", alpha, r, n) * (1 - 1e-12) <= g <= scaling_factor("sfed", alpha, r, n) * (1 + 1e-12)
    rho2 = data.draw(st.floats(min_value=rho, max_value=1.0))
    assert scaling_factor("sfed-general", alpha, r, n, rho=rho2) <= g * (1 + 1e-12)


@SETTINGS
@given(clients, st.data())
def test_participation_uses_sampled_clients(n, data):
    k = data.draw(st.integers(min_value=1, max_value=n))
    assert scaling_factor("sfed-general", 8, 64, n, participating=k) == pytest.approx(scaling_factor("sfed", 8, 64, k))


def test_unequal_weights_lower_the_effective_count():
    # one client holding most of the data: N_eff -> about 1
    n_eff = effective_clients(4, weights=[97, 1, 1, 1])
    assert n_eff == pytest.approx(1 / (0.97**2 + 3 * 0.01**2))
    assert 1.0 < n_eff < 1.1
    assert effective_clients(4, weights=[1, 1, 1, 1]) == pytest.approx(4.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rule="dora"), "unknown rule 'dora'; allowed rules: lora, rslora, sfed, sfed-general"),
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(rank=2.5), "rank must be an integer >= 1"),
        (dict(rank=float("nan")), "rank must be finite"),
        (dict(n_clients=0), "n_clients must be an integer >= 1"),
        (dict(alpha=-1.0), "alpha must be > 0"),
        (dict(alpha=float("inf")), "alpha must be finite"),
        (dict(rho=0.3), "takes no extra arguments"),
        (dict(rule="sfed-general", rho=1.5), r"rho \(client correlation\) assumed by .sfed-general. must lie in \[0, 1\]"),
        (dict(rule="sfed-general", rho=-0.1), r"must lie in \[0, 1\]"),
        (dict(rule="sfed-general", rho=float("nan")), "rho must be finite"),
        (dict(rule="sfed-general", participating=9), "participating=9 exceeds n_clients=8"),
        (dict(rule="sfed-general", weights=[1, -1, 1, 1, 1, 1, 1, 1]), "weights must be non-negative"),
        (dict(rule="sfed-general", weights=[0] * 8), "must not be all zero"),
        (dict(rule="sfed-general", weights=[1, 2]), "weights has 2 entries but n_clients=8"),
        (dict(rule="sfed-general", weights=[1] * 7 + [float("nan")]), "weights must be finite"),
        (dict(rule="sfed-general", beta=1), "unknown arguments"),
    ],
)
def test_bad_input_says_what_is_wrong(kwargs, match):
    args = dict(rule="sfed", alpha=16.0, rank=8, n_clients=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        scaling_factor(**args)
