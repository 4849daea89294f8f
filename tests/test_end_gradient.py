"""The affine end-gradient bounds (sfed_theory.affine_bound) and their measurement (validation.end_gradient)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfed_theory.affine_bound import derive_drop_bound, drop_bound, noise_difference_ratio
from validation.end_gradient import end_gradient_ratios, fixed_gamma_test, sfed_drops

ALPHA = 16.0


def _n_eff(k: float, rho: float) -> float:
    return k / (1 + (k - 1) * rho)


def _class_ratio(g: float, k: float, p: float, e: float, m: float, rho: float) -> float:
    """R of an affine model with q = p^2 + e (e >= 0), noise m and client correlation rho."""
    return 1 + 2 * g * p + g**2 * (p**2 + e) + g**2 * m / _n_eff(k, rho)


@settings(max_examples=300, deadline=None)
@given(p=st.floats(-3, 3), e=st.floats(0, 2), m=st.floats(0, 5), rho=st.floats(0, 0.95), g=st.floats(0.01, 10),
       k=st.sampled_from([1, 2, 4, 16]), c=st.floats(1.05, 6))
def test_no_affine_model_drops_more_than_the_bound(p, e, m, rho, g, k, c):
    drop = _class_ratio(g, k, p, e, m, rho) - _class_ratio(c * g, c * c * k, p, e, m, rho)
    assert drop <= drop_bound(c) + 1e-9


def test_the_bound_is_attained_and_is_one_third_for_sfed():
    d = derive_drop_bound()
    assert drop_bound(2.0) == pytest.approx(1 / 3) and drop_bound(4.0) == pytest.approx(3 / 5)
    for c in (1.5, 2.0, 4.0):  # the supremum is reached: no slack in the derived bound
        ts = np.linspace(-2, 1, 30001)
        best = max(_class_ratio(1.0, 1, t, 0, 0, 0) - _class_ratio(c, c * c, t, 0, 0, 0) for t in ts)
        assert best == pytest.approx(drop_bound(c), abs=1e-6)
    (c_sym,) = d.bound.free_symbols
    assert float(d.argmax.subs(c_sym, 2)) == pytest.approx(-1 / 3)
    with pytest.raises(ValueError, match="grow"):
        drop_bound(1.0)


def _simulate_ratio(gamma, k, *, rho=0.1, response=None, follow=0.0, identity=False, noise=0.3, draws=40000,
                    dim=6, seed=0):
    """Monte Carlo of R for an explicit end-gradient model: probe gradient a, a fixed linear map H
    (curvature; the identity if ``identity``), the clients' mean increment D (a fixed vector, minus
    ``follow`` times a: an increment that descends the probe's gradient) and exchangeable client noise with
    correlation rho, averaged over k clients. ``response`` replaces the affine map by another function of
    the update."""
    rng = np.random.default_rng(seed)
    h = np.eye(dim) if identity else rng.standard_normal((dim, dim)) / dim
    a = rng.standard_normal((draws, dim)) + 0.5
    d_mean = -0.4 * rng.standard_normal(dim) / math.sqrt(dim) * (not identity) - follow * a
    shared = rng.standard_normal((draws, dim))
    own = rng.standard_normal((draws, k, dim)).mean(1)  # the average of k clients' independent parts
    update = gamma * (d_mean + noise * (math.sqrt(rho) * shared + math.sqrt(1 - rho) * own))
    end = a + (update @ h.T if response is None else response(update, h))
    return float((end**2).sum(1).mean() / (a**2).sum(1).mean())


def test_fixed_gamma_weight_against_monte_carlo_of_an_affine_model():
    # weight 4 between consecutive drops of an explicit affine model (any H, rho), and not for a
    # super-quadratic response
    w = noise_difference_ratio(1, 4, 16)
    assert w == 4.0 and noise_difference_ratio(1, 2, 4) == 2.0
    r = [_simulate_ratio(2.0, k) for k in (1, 4, 16)]
    assert (r[0] - r[1]) == pytest.approx(w * (r[1] - r[2]), rel=0.08)
    cubic = lambda u, h: u @ h.T + 3 * (u**3)  # noqa: E731
    rc = [_simulate_ratio(2.0, k, response=cubic) for k in (1, 4, 16)]
    assert (rc[0] - rc[1]) > 1.3 * w * (rc[1] - rc[2])


def test_sfed_drop_of_an_affine_model_reaches_but_never_exceeds_the_bound_in_monte_carlo():
    # an increment that descends the probe gradient, D = -f a, with H = I: t = gamma p = -gamma f, and the
    # drop from (gamma, K) to (2 gamma, 4K) is largest at t = -1/3, where it equals the bound
    for gf, noise in ((1 / 3, 0.0), (1 / 3, 0.3), (0.2, 0.0), (0.6, 0.3)):
        r1 = _simulate_ratio(1.0, 1, follow=gf, identity=True, noise=noise)
        r4 = _simulate_ratio(2.0, 4, follow=gf, identity=True, noise=noise)
        assert r1 - r4 <= drop_bound(2.0) + 1e-9
        if gf == 1 / 3 and noise == 0.0:
            assert r1 - r4 == pytest.approx(drop_bound(2.0), abs=1e-9)
    assert _simulate_ratio(1.0, 1, follow=0.6, identity=True, noise=0.3) - _simulate_ratio(
        2.0, 4, follow=0.6, identity=True, noise=0.3) < drop_bound(2.0) - 0.05


def _rows(ratio, seeds=(0, 1, 2, 3), ranks=(4,), parts=("iid",), jitter=0.0, seed_spread=0.0):
    """FFA round-1 ``__all__`` rows with grad_B_end / grad_B = sqrt(ratio(rule, rank, N)) per seed, times a
    per-cell noise (``jitter``) and a per-seed factor shared by every cell (``seed_spread``)."""
    rng = np.random.default_rng(1)
    seed_factor = {s: 1 + seed_spread * rng.uniform(-1, 1) for s in seeds}
    out = []
    for part in parts:
        for rank in ranks:
            for rule, ns in (("lora", (1, 4, 16)), ("rslora", (1, 4, 16)), ("sfed", (4, 16))):
                for n in ns:
                    gamma = {"lora": ALPHA / rank, "rslora": ALPHA / math.sqrt(rank),
                             "sfed": ALPHA * math.sqrt(n / rank)}[rule]
                    for s in seeds:
                        start = gamma * (1 + 0.2 * s)
                        r = ratio(rule, rank, n) * (1 + jitter * rng.standard_normal()) * seed_factor[s]
                        out.append(dict(layer="__all__", scheme="ffa", round=1, diverged=False, partition=part,
                                        rank=rank, rule=rule, n_clients=n, seed=s, gamma=gamma, grad_B=start,
                                        grad_B_end=start * math.sqrt(r), n_eff_ratio=n / (1 + 0.05 * (n - 1))))
    return pd.DataFrame(out)


def test_ratio_is_the_ratio_of_seed_means_of_squares():
    rows = _rows(lambda *_: 1.0, seeds=(0, 1))
    cell = (rows.rule == "lora") & (rows.n_clients == 4)
    rows.loc[cell & (rows.seed == 0), ["grad_B", "grad_B_end"]] = [1.0, 2.0]
    rows.loc[cell & (rows.seed == 1), ["grad_B", "grad_B_end"]] = [3.0, 1.0]
    r = end_gradient_ratios(rows).set_index(["rule", "n_clients"]).R
    assert r[("lora", 4)] == pytest.approx((4 + 1) / (1 + 9))  # not the mean of ratios, (4 + 1/9) / 2
    assert r[("sfed", 1)] == pytest.approx(1.0)  # N = 1 of SFed is rsLoRA's run
    sf = (rows.rule == "sfed") & (rows.n_clients == 4)
    rows.loc[sf & (rows.seed == 0), "grad_B_end"] = 0.5 * rows.loc[sf & (rows.seed == 0), "grad_B"]
    d = sfed_drops(rows, n_boot=50).set_index("n_from")
    s0, s1 = rows.loc[sf & (rows.seed == 0), "grad_B"].item(), rows.loc[sf & (rows.seed == 1), "grad_B"].item()
    assert d.loc[1, "R_to"] == pytest.approx((0.25 * s0**2 + s1**2) / (s0**2 + s1**2))
    assert d.loc[1, "drop"] == pytest.approx(1 - d.loc[1, "R_to"]) and d.loc[4, "R_from"] == d.loc[1, "R_to"]


def test_sfed_drops_flag_a_drop_beyond_the_bound_and_pass_one_under_it():
    big = {1: 1.9, 4: 1.0, 16: 0.9}
    small = {1: 1.2, 4: 1.0, 16: 0.85}
    for table, flagged in ((big, [True, False]), (small, [False, False])):
        rows = _rows(lambda rule, rank, n, t=table: t[n], seeds=tuple(range(12)), jitter=0.02)
        d = sfed_drops(rows, n_boot=400)
        assert d.gamma_ratio.tolist() == pytest.approx([2.0, 2.0])
        assert d["drop"].tolist() == pytest.approx([table[1] - table[4], table[4] - table[16]], abs=0.05)
        assert d.above_affine_bound.tolist() == flagged
        assert d.affine_bound.tolist() == pytest.approx([1 / 3, 1 / 3])


def test_the_bootstrap_pairs_seeds_across_cells():
    # every seed scales R in every cell alike (it shares the probe and A init); a drop of 0.5 is then
    # pinned above 1/3 by the paired bootstrap, which independent draws per cell would not do
    rows = _rows(lambda rule, rank, n: {1: 1.5, 4: 1.0, 16: 0.9}[n], seeds=tuple(range(12)), seed_spread=0.7)
    d = sfed_drops(rows, n_boot=1000).set_index("n_from")
    assert d.loc[1, "above_affine_bound"] and d.loc[1, "ci_high"] - d.loc[1, "ci_low"] < 0.3
    assert d.neff_premise.all() and d.loc[4, "n_eff_to"] == pytest.approx(16 / 1.75)


def test_fixed_gamma_test_passes_an_affine_table_and_flags_a_super_quadratic_one():
    affine = lambda rule, rank, n: 0.9 + 0.4 * (0.05 + 0.95 / n)  # noqa: E731  (affine in c_N)
    d = fixed_gamma_test(_rows(affine, seeds=tuple(range(10)), jitter=0.01), n_boot=400)
    assert len(d) == 2 and not d.excess_nonzero.any() and d.excess.abs().max() < 0.03
    steep = lambda rule, rank, n: 0.9 + 0.4 * (0.05 + 0.95 / n) ** 2  # noqa: E731
    d = fixed_gamma_test(_rows(steep, seeds=tuple(range(10)), jitter=0.01), n_boot=400)
    assert d.excess_nonzero.all() and (d.excess > 0.1).all()
    with pytest.raises(ValueError, match="gamma changes"):
        fixed_gamma_test(_rows(affine), rules=("sfed",))


def test_rows_without_ffa_or_with_missing_seeds_are_refused():
    rows = _rows(lambda *_: 1.0)
    with pytest.raises(ValueError, match="FFA"):
        end_gradient_ratios(rows.assign(scheme="fedit"))
    with pytest.raises(ValueError, match="seeds"):
        end_gradient_ratios(rows.drop(index=rows.index[(rows.rule == "lora") & (rows.seed == 3)][:1]))
