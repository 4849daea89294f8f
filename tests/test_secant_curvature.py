"""The model's secant curvature along the update and the measured curvature's rank slope."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sfed_theory.montecarlo import ModelParams, simulate
from sfed_theory.rules import scaling_factor
from validation.refined import RefinedParams
from validation.secant_curvature import (curvature_rise, measured_n_ratio, measured_rank_slope, model_secant_curvature,
                                         secant_slopes)

D, K_IN, ALPHA = 6, 5, 8.0
PARAMS = RefinedParams(scheme="fedit", partition="iid", f_in=0.3, phi=0.4, rho_f=0.3, lam=2.0,
                       tau2x2={2: 0.5, 4: 0.7}, s_B={"sfed": 0.02}, s_dA={"sfed": 0.01}, d=D, k=K_IN, pilot_max_n=4,
                       n_pilot_points=8, rms_log_residual=0.0, nu=0.3, kappa=0.6, nu_g=0.8, lam_rank=0.7)


def test_the_secant_identity_on_small_tensors():
    """<lam dW C_g, dW> = lam (||dW z||^2 + nu_g ||dW||_F^2) for C_g = z z^T + nu_g I: the identity the module
    turns into a ratio of two derived moments."""
    rng = np.random.default_rng(0)
    dw, z = rng.standard_normal((4, 3)), rng.standard_normal(3)
    z /= np.linalg.norm(z)
    lam, nu_g = 1.7, 0.4
    direct = float(np.sum(lam * dw @ (np.outer(z, z) + nu_g * np.eye(3)) * dw))
    assert direct == pytest.approx(lam * (np.sum((dw @ z) ** 2) + nu_g * np.sum(dw**2)), rel=1e-12)


@pytest.mark.parametrize("rank", [2, 4])
def test_model_secant_curvature_matches_a_monte_carlo_of_the_same_model(rank):
    """lambda(r) E[||dW z||^2 + nu_g ||dW||^2] / E||dW||^2, the sampled update with the output vector at z and
    the gradient's bulk, agrees with the closed forms' ratio (three standard errors of the MC ratio)."""
    kk = 4
    model = ModelParams(d=D, k=K_IN, r=rank, n_clients=kk, gamma=scaling_factor("sfed", ALPHA, rank, kk),
                        rho=PARAMS.rho, s_A=1 / math.sqrt(3 * K_IN), s_B=0.02, s_dA=0.01,
                        tau=math.sqrt(PARAMS.tau2x2[rank]), f_in=0.3, phi=0.4, nu=0.8, kappa=1.0)
    est = simulate(model, "fedit", "adam-refined", n_samples=60_000, seed=1,
                   quantities=("adapter_output", "update_fro"))
    resp, upd = est["adapter_output"].samples, est["update_fro"].samples
    ratio = resp.mean() / upd.mean()
    # delta-method standard error of a ratio of means
    cov = np.cov(resp, upd)
    se = ratio * math.sqrt(cov[0, 0] / resp.mean() ** 2 + cov[1, 1] / upd.mean() ** 2
                           - 2 * cov[0, 1] / (resp.mean() * upd.mean())) / math.sqrt(resp.size)
    got = model_secant_curvature(PARAMS, "sfed", [rank], [kk], [kk], ALPHA)[0]
    want = 2.0 * (rank / 16) ** 0.7 * ratio
    assert abs(got - want) <= 3 * 2.0 * (rank / 16) ** 0.7 * se


def test_a_saturating_model_has_no_single_secant_curvature():
    from dataclasses import replace

    with pytest.raises(ValueError, match="two curvatures"):
        model_secant_curvature(replace(PARAMS, t0=0.1), "sfed", [2], [4], [4], ALPHA)


def test_measured_rank_slope_is_the_slope_of_the_seed_mean_by_hand():
    """Two seeds at r = 4, 16: seed means (2, 6), slope log 3 / log 4 (not the mean of per-seed slopes)."""
    rows = pd.DataFrame({"seed": [0, 0, 1, 1], "rank": [4, 16, 4, 16], "curvature": [1.0, 2.0, 3.0, 10.0]})
    slope, lo, hi = measured_rank_slope(rows, n_boot=200)
    assert slope == pytest.approx(math.log(3) / math.log(4), rel=1e-12)
    per_seed = (math.log(2) + math.log(10 / 3)) / 2 / math.log(4)
    assert abs(slope - per_seed) > 0.01
    assert lo <= slope <= hi and lo == pytest.approx(math.log(2) / math.log(4)) and hi == pytest.approx(
        math.log(10 / 3) / math.log(4))


def test_secant_slopes_compare_a_known_power_law_with_the_model():
    """Rows whose curvature is c_seed r^s: the measured slope is s with a zero-width CI, and the model's slope is
    its own geometry plus lam_rank."""
    rows = pd.DataFrame([{"scheme": "fedit", "optimizer": "adamw", "partition": "iid", "rule": "sfed", "n_clients": 4,
                          "n_participating": 4, "rank": r, "seed": s, "alpha": ALPHA, "layer": "__all__", "round": 1,
                          "curvature": (1 + s) * r ** 0.9} for r in (2, 4) for s in range(3)])
    out = secant_slopes(rows, {("fedit", "adamw", "iid", "grad_B"): PARAMS}, n_boot=50)
    assert len(out) == 1
    row = out.iloc[0]
    assert row.measured == pytest.approx(0.9) and row.ci_low == pytest.approx(0.9) and row.ci_high == pytest.approx(0.9)
    assert row.model == pytest.approx(row.model_geometry + 0.7, abs=1e-9)
    assert bool(row.agrees) == (abs(row.model - 0.9) <= 0.05)


def test_measured_n_ratio_is_the_ratio_of_seed_means_by_hand():
    """(2 + 4)/2 over (1 + 3)/2 = 1.5, not the mean of the per-seed ratios ((2 + 4/3)/2 = 1.67); a seed resampled
    alone gives 2 or 4/3, so the CI lies within those; a missing N gives NaN."""
    rows = pd.DataFrame({"seed": [0, 0, 1, 1], "n_clients": [1, 4, 1, 4], "curvature": [1.0, 2.0, 3.0, 4.0]})
    ratio, lo, hi = measured_n_ratio(rows, 1, 4, n_boot=400)
    assert ratio == pytest.approx(1.5)
    assert 4 / 3 - 1e-12 <= lo <= ratio <= hi <= 2.0 + 1e-12 and lo < hi
    assert all(math.isnan(v) for v in measured_n_ratio(rows, 4, 16))


def test_curvature_rise_tabulates_each_point_and_step():
    """Per (scheme, partition, rule, rank): N = 1 -> 4 and 4 -> 16 from the ``__all__`` rows of the round only; a
    point without N = 1 (SFed's grid) keeps its 4 -> 16 step."""
    base = dict(scheme="ffa", partition="iid", layer="__all__", round=1)
    rows = [dict(base, rule="lora", rank=4, seed=s, n_clients=n, curvature=c * (1 + s))
            for s in (0, 1) for n, c in ((1, 1.0), (4, 1.0), (16, 1.5))]
    rows += [dict(base, rule="sfed", rank=4, seed=s, n_clients=n, curvature=c)
             for s in (0, 1) for n, c in ((4, 2.0), (16, 1.0))]
    rows += [dict(base, rule="lora", rank=4, seed=0, n_clients=16, curvature=99.0, layer="q.0"),
             dict(base, rule="lora", rank=4, seed=0, n_clients=16, curvature=99.0, round=2)]
    t = curvature_rise(pd.DataFrame(rows), n_boot=50)
    got = {(u, a, b): v for u, a, b, v in t[["rule", "n_from", "n_to", "ratio"]].itertuples(index=False)}
    assert got == pytest.approx({("lora", 1, 4): 1.0, ("lora", 4, 16): 1.5, ("sfed", 4, 16): 0.5})
