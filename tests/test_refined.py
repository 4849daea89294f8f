"""The refined model's estimation uses the pilot runs only, and its predictions are the derived closed forms."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from sfed_theory.predict import predicted_norm
from test_harness_helpers import synth
from validation.analysis import fit_exponents, refined_fits
from validation.federated import run
from validation.refined import fit_refined, predict_points


@pytest.fixture(scope="module")
def small_grid() -> pd.DataFrame:
    cfgs = [synth(rule=rule, n_clients=n, rank=r, seed=s, rounds=1, partition="iid")
            for rule in ("lora", "sfed") for n in (1, 2, 4) for r in (2, 4) for s in (0, 1)]
    return pd.concat([run(c) for c in cfgs], ignore_index=True)


def test_parameters_come_from_the_pilot_runs_only(small_grid):
    p = fit_refined(small_grid, pilot_max_n=2)
    spoiled = small_grid.copy()
    big = spoiled.n_clients > 2
    for col in ("adapter_rms", "update_fro", "grad_A_end", "grad_B_end", "rho_ratio", "inc_B_rms", "grad_B"):
        spoiled.loc[big, col] *= 7.0  # anything beyond the pilot must not move the estimates
    q = fit_refined(spoiled, pilot_max_n=2)
    assert (p.f_in, p.phi, p.lam, p.rho_f) == (q.f_in, q.phi, q.lam, q.rho_f)
    assert p.s_B == q.s_B and p.tau2x2 == q.tau2x2
    assert 0 <= p.f_in <= 0.5 and 0 <= p.phi <= 0.5
    with pytest.raises(ValueError, match="pilot part"):
        fit_refined(small_grid[small_grid.n_clients == 1], pilot_max_n=2)


def test_predictions_are_the_derived_closed_forms(small_grid):
    p = fit_refined(small_grid, pilot_max_n=2)
    for q in ("adapter_output", "update_fro", "grad_A", "grad_B"):
        got = predict_points(p, q, "sfed", [2, 4], [4, 4], [4, 4], 16.0)
        for i, r in enumerate((2, 4)):
            want = predicted_norm(q, "sfed", regime="adam-refined", scheme=p.scheme, rank=r, n_clients=4,
                                  alpha=16.0, rho=p.rho, d=p.d, k=p.k, s_A=1 / math.sqrt(3 * p.k), s_B=p.s_B["sfed"],
                                  tau=math.sqrt(p.tau2x2[r]), x_norm2=1.0, f_in=p.f_in, phi=p.phi, lam=p.lam)
            assert got[i] == pytest.approx(want, rel=1e-10), q


def test_exponent_table_has_refined_columns_and_labels_out_of_sample(small_grid):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = refined_fits(small_grid, pilot_max_n=2)
        fits = fit_exponents(small_grid, n_boot=50, refined=params, pilot_max_n=2)
    assert {"predicted_refined", "agrees_refined", "in_ci_refined", "refined_sample"} <= set(fits.columns)
    n_fits = fits[fits.wrt == "n_clients"]
    assert (n_fits.refined_sample == "out").all()  # N runs to 4, beyond the pilot
    r_fits = fits[fits.wrt == "rank"]
    assert set(r_fits.loc[r_fits.fixed_value <= 2, "refined_sample"]) == {"in"}
    assert set(r_fits.loc[r_fits.fixed_value == 4, "refined_sample"]) == {"out"}
    assert fits.predicted_refined.notna().all()
    # agreement is stated two ways, and they are different claims
    tol = (fits.predicted_refined - fits.measured).abs() <= 0.05
    assert (fits.agrees_refined == tol).all()
    ci = (fits.ci_low <= fits.predicted_refined) & (fits.predicted_refined <= fits.ci_high)
    assert (fits.in_ci_refined == ci).all()


def test_pilot_table_takes_the_rms_of_norms_and_the_mean_of_scales():
    """Two seeds of one cell: norms 3 and 4 give sqrt((9 + 16) / 2), not their mean 3.5; scales average."""
    from validation.refined import _pilot_table

    base = dict(rule="lora", rank=4, n_clients=4, n_participating=4, gamma=4.0, alpha=16.0, rho_ratio=0.1)
    rows = pd.DataFrame([{**base, "adapter_rms": v, "update_fro": v, "grad_A_end": v, "grad_B_end": v, "grad_B": v,
                          "inc_B_rms": s, "inc_A_rms": s} for v, s in ((3.0, 1.0), (4.0, 2.0))])
    t = _pilot_table(rows)
    assert len(t) == 1
    for c in ("adapter_rms", "update_fro", "grad_A_end", "grad_B_end", "grad_B"):
        assert t[c].iloc[0] == pytest.approx(math.sqrt(12.5))
    assert t.inc_B_rms.iloc[0] == pytest.approx(1.5) and t.gamma.iloc[0] == 4.0


def test_label_skew_share_lowers_the_pairwise_correlation_as_one_over_k_minus_one(small_grid):
    """A zero-sum skew part of variance share s correlates -1/(K-1) between clients: the pairwise rho at
    K clients is rho_f - s/(K-1); with one client nothing changes; s = 0 leaves rho as it was."""
    p = fit_refined(small_grid, pilot_max_n=2)
    assert p.rho_skew == 0.0 and np.allclose(p.rho_at([1, 2, 16]), p.rho)
    from dataclasses import replace

    q = replace(p, f_in=0.0, rho_f=0.04, rho_skew=0.09)
    assert np.allclose(q.rho_at([1, 2, 4, 16]), [0.04, 0.04 - 0.09, 0.04 - 0.03, 0.04 - 0.006])
    got = predict_points(q, "update_fro", "lora", [4], [16], [16], 16.0)[0]
    want = predicted_norm("update_fro", "lora", regime="adam-refined", scheme=q.scheme, rank=4, n_clients=16, alpha=16.0,
                          rho=0.034, d=q.d, k=q.k, s_A=1 / math.sqrt(3 * q.k), s_B=q.s_B["lora"],
                          tau=math.sqrt(q.tau2x2[4]), x_norm2=1.0, f_in=0.0, phi=q.phi, lam=q.lam)
    assert got == pytest.approx(want, rel=1e-10)


def test_skewed_split_takes_its_unskewed_correlation_from_the_iid_pilot(small_grid):
    """A copy of the grid labelled Dirichlet whose correlations are 0.05 lower: its pilot (N = 2) gives
    s = (K-1) (rho_iid - rho_K) = 0.05, and the model reproduces the skewed pilot's own correlation."""
    skewed = small_grid.assign(partition="dirichlet")
    for col in ("rho_ratio", "rho_out", "rho_gA", "rho_gB"):
        skewed[col] = skewed[col] - 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = refined_fits(pd.concat([small_grid, skewed], ignore_index=True), pilot_max_n=2, correlation_law="k")
    iid, dirichlet = params[("ffa", "adamw", "iid", "update_fro")], params[("ffa", "adamw", "dirichlet", "update_fro")]
    assert iid.rho_skew == 0.0
    assert dirichlet.rho_f == pytest.approx(iid.rho_f) and dirichlet.rho_skew == pytest.approx(0.05)
    pilot = skewed[(skewed.layer == "__all__") & (skewed.n_clients == 2)]
    pair = dirichlet.rho_f - dirichlet.rho_skew / (2 - 1)
    assert pair == pytest.approx(pilot.rho_ratio.mean())


@pytest.mark.parametrize("k", [4, 16])
def test_zero_sum_skew_model_against_monte_carlo(k):
    """Clients x_i = c + s_i + e_i with a common part (share a), a zero-sum skew part (share s: the s_i
    add up to 0 over the clients) and independent noise. The harness's ratio estimate of rho is
    a - s/(K-1) and the average's squared norm is m2 (a + (1 - a - s)/K): the skew cancels."""
    from validation.metrics import gram, ratio_rho

    rng = np.random.default_rng(k)
    a, s, dim, draws = 0.04, 0.09, 4000, 200
    rhos, shrink = [], []
    for _ in range(draws):
        c = rng.normal(size=dim) * math.sqrt(a)
        z = rng.normal(size=(k, dim))
        skew = math.sqrt(k / (k - 1)) * (z - z.mean(0)) * math.sqrt(s)
        x = c + skew + rng.normal(size=(k, dim)) * math.sqrt(1 - a - s)
        rhos.append(ratio_rho(gram(torch.as_tensor(x)), np.full(k, 1 / k)))
        shrink.append(np.sum(x.mean(0) ** 2) / np.mean(np.sum(x ** 2, 1)))
    se = lambda v: 5 * np.std(v) / math.sqrt(draws) + 1e-4  # noqa: E731
    assert np.mean(rhos) == pytest.approx(a - s / (k - 1), abs=se(rhos))
    assert np.mean(shrink) == pytest.approx(a + (1 - a - s) / k, abs=se(shrink))


def _sampled_contributions(p, column: str, rule: str, rank: int, k_avg: int, alpha: float, samples: int, seed: int):
    """Draw the refined model (A frozen under FFA, trained otherwise) and return each sample's clients'
    contributions (samples, K, -1) as the harness forms them (metrics.client_contributions; FedSA's at the
    shared adapter, Bbar and Abar, as the harness probes it)."""
    from validation.refined import _gamma

    rng = np.random.default_rng(seed)
    d, k, r, kk = p.d, p.k, rank, k_avg
    s_a, s_b, s_da, tau = 1 / math.sqrt(3 * k), p.s_B[rule], p.s_dA[rule], math.sqrt(p.tau2x2[rank])
    gam, rho = _gamma(rule, alpha, r, kk), float(p.rho_at(kk))
    x = np.zeros(k)
    x[0] = 1.0  # ||x||^2 = 1, as predict_points takes it

    def correlated(*shape):
        return math.sqrt(rho) * rng.standard_normal((samples, 1, *shape)) + \
            math.sqrt(1 - rho) * rng.standard_normal((samples, kk, *shape))

    a = s_a * rng.standard_normal((samples, 1, r, k))
    g = tau * rng.standard_normal((samples, 1, d))
    u = -math.sqrt(p.phi) * g / tau + math.sqrt(1 - p.phi) * rng.standard_normal((samples, kk, d))
    coherent = math.sqrt(p.f_in) * s_b / s_a * u[..., None] * (a @ x)[:, :, None, :]
    b = coherent + math.sqrt(1 - p.f_in) * s_b * correlated(d, r)
    a_i = a + s_da * correlated(r, k) if p.scheme != "ffa" else np.broadcast_to(a, b.shape[:2] + (r, k))
    dw = gam * b.mean(1) @ a_i.mean(1)
    probe = (g[:, 0, :, None] + p.lam * (dw @ x)[:, :, None]) * x  # (g + lam dW x) x^T
    if column == "rho_out":
        return (gam * (b @ a_i) @ x).reshape(samples, kk, -1)
    if column == "rho_gA":
        return (np.swapaxes(b, 2, 3) @ probe[:, None]).reshape(samples, kk, -1)
    return (probe[:, None] @ np.swapaxes(a_i - a, 2, 3)).reshape(samples, kk, -1)


@pytest.mark.parametrize(("column", "scheme"), [("rho_out", "ffa"), ("rho_gA", "ffa"), ("rho_gB", "fedit"),
                                               ("rho_out", "fedit"), ("rho_gA", "fedsa")])
def test_model_correlation_is_the_harness_estimate_on_sampled_contributions(column, scheme):
    """The model's value of a projected correlation, (K E||mean||^2 / E||one||^2 - 1) / (K - 1) from two
    derived closed forms, against the harness's ratio estimate (validation.metrics.ratio_rho) of the
    Gram matrix of contributions sampled from the same model, pooled over samples (Grams add). The
    parameters make the projection differ from the increments' correlation, so returning rho fails."""
    from dataclasses import replace

    from validation.metrics import ratio_rho
    from validation.refined import RefinedParams, _model_correlation, predicted_correlation

    p = RefinedParams(scheme, "iid", f_in=0.4, phi=0.5, rho_f=0.0, lam=0.8, tau2x2={3: 0.7}, s_B={"lora": 0.9},
                      s_dA={"lora": 0.6}, d=6, k=5, pilot_max_n=4, n_pilot_points=0, rms_log_residual=0.0,
                      rho_column=column, rho_model=0.1)
    kk = 3
    c = _sampled_contributions(p, column, "lora", 3, kk, 8.0, samples=40_000, seed=5)
    pooled = np.einsum("sif,sjf->ij", c, c)
    measured = ratio_rho(pooled, np.full(kk, 1 / kk))
    model = float(predicted_correlation(p, "lora", [3], [kk], 8.0)[0])
    assert model == pytest.approx(float(_model_correlation(p, column, "lora", np.array([3.0]), np.array([3.0]), 8.0,
                                                           p.rho_at(kk))[0]))
    assert abs(model - measured) < 0.02
    assert abs(model - p.rho) > 0.05  # the check can tell the projection from the increments' correlation
    with pytest.raises(ValueError, match="two clients"):
        predicted_correlation(replace(p), "lora", [3], [1], 8.0)


def test_fit_reproduces_the_pilot_projected_correlation(small_grid):
    """With a projected correlation the non-coherent rho is solved so that the model's own value of that
    correlation, averaged over the pilot points, is the measured one (or the gap says by how much not)."""
    from validation.refined import predicted_correlation

    p = fit_refined(small_grid, pilot_max_n=2, quantities=("grad_A",), rho_column="rho_gA")
    assert p.rho_model is not None and abs(p.rho_gap) < 1e-9  # reachable on this grid
    pilot = small_grid[(small_grid.layer == "__all__") & (small_grid.n_clients == 2)]
    cells = pilot.groupby(["rule", "rank"], as_index=False).alpha.mean()
    model = np.mean([predicted_correlation(p, row.rule, [row.rank], [2], row.alpha)[0] for row in cells.itertuples()])
    assert model == pytest.approx(pilot.rho_gA.mean(), abs=1e-6)
    frobenius = fit_refined(small_grid, pilot_max_n=2, quantities=("grad_A",), rho_column="rho_ratio")
    assert frobenius.rho_model is None and frobenius.rho_gap == 0.0
    # exact aggregation has no derived client projections: it keeps the Frobenius mapping
    exact = fit_refined(small_grid.assign(scheme="exact"), pilot_max_n=2, quantities=("adapter_output",),
                        rho_column="rho_out")
    assert exact.rho_model is None


def test_a_pilot_with_two_client_counts_fits_its_own_k_law(small_grid):
    """Pilot N in {1, 2, 4}: rho_K = rho - s/(K-1) through the per-K means, in the measured units for the
    Frobenius correlation and in the model's for a projected one (whose model value then matches the
    measured mean at each pilot K, or the gap says by how much not)."""
    from validation.refined import predicted_correlation

    pilot = small_grid[(small_grid.layer == "__all__") & (small_grid.n_clients.isin([2, 4]))]
    means = pilot.groupby("n_clients").rho_ratio.mean()
    p = fit_refined(small_grid, pilot_max_n=4, quantities=("update_fro",))
    assert [p.rho_f - p.rho_skew / (k - 1) for k in (2, 4)] == pytest.approx(list(means), abs=1e-12)
    assert p.rho_skew != 0.0
    q = fit_refined(small_grid, pilot_max_n=4, quantities=("grad_A",), rho_column="rho_gA")
    assert abs(q.rho_gap) < 1e-9  # reachable on this grid: the model reproduces both pilot means
    for k in (2, 4):
        cells = pilot[pilot.n_clients == k].groupby(["rule", "rank"], as_index=False).alpha.mean()
        model = np.mean([predicted_correlation(q, c.rule, [c.rank], [k], c.alpha)[0] for c in cells.itertuples()])
        assert model == pytest.approx(pilot[pilot.n_clients == k].rho_gA.mean(), abs=1e-6)


def test_a_fit_keeps_the_client_covariance_valid_at_every_k(small_grid):
    """rho_K >= -1/(K-1) at every K the model may predict (else its moments at large K turn negative)."""
    from dataclasses import replace

    from validation.refined import _valid_correlation

    p = fit_refined(small_grid, pilot_max_n=4, quantities=("grad_A",), rho_column="rho_gA")
    assert _valid_correlation(p)
    assert not _valid_correlation(replace(p, rho_model=-0.1, rho_skew=0.0))  # invalid from K = 12 on
    assert _valid_correlation(replace(p, rho_model=0.0, rho_skew=0.5))  # -0.5/(K-1) >= -1/(K-1)
    assert not _valid_correlation(replace(p, rho_model=0.0, rho_skew=1.5))


def test_a_negative_correlation_flat_in_k_is_a_zero_sum_part_with_its_gap_reported(small_grid):
    """Measured -0.05 at both K = 2 and 4: a K-law with rho_inf < 0 is no random model at large K, so rho
    is held at 0, the negative part is zero-sum (s > 0), and what it cannot match is the gap."""
    from validation.refined import _valid_correlation

    flat = small_grid.copy()
    flat.loc[flat.n_clients > 1, "rho_gA"] = -0.05
    q = fit_refined(flat, pilot_max_n=4, quantities=("grad_A",), rho_column="rho_gA")
    assert q.rho == 0.0 and q.rho_skew > 0 and _valid_correlation(q)
    assert abs(q.rho_gap) > 1e-3 and math.isfinite(q.rho_gap)


def test_extra_pilot_runs_join_only_at_the_checks_learning_rate():
    from validation.analysis import with_pilot_runs

    check = pd.DataFrame({"lr": [1e-3, 1e-3], "n_clients": [1, 4]})
    extra = pd.DataFrame({"lr": [1e-3, 2.5e-4, 2.5e-4], "n_clients": [2, 2, 2]})
    joined = with_pilot_runs(check, extra)
    assert list(joined.lr) == [1e-3, 1e-3, 1e-3] and list(joined.n_clients) == [1, 4, 2]
    assert with_pilot_runs(check, None) is check
    assert len(with_pilot_runs(check.assign(lr=2.5e-4), extra)) == 4


def test_label_law_targets_are_reproduced_at_every_k(small_grid):
    """With ``correlation_at`` (the label law's correlation per K) the model reproduces it at every K, the
    pilot's and those it predicts: in the measured units for the Frobenius correlation, through the derived
    projection for a projected one; a K it was not solved at is an error, not a silent extrapolation."""
    from validation.refined import predicted_correlation

    targets = {2: -0.02, 4: 0.01, 16: 0.03}
    p = fit_refined(small_grid, pilot_max_n=4, quantities=("update_fro",), correlation_at=targets)
    assert p.label_law and p.rho_skew == 0.0
    for k, c in targets.items():
        assert predicted_correlation(p, "lora", [2], [k], 16.0)[0] == pytest.approx(c, abs=1e-12)
    q = fit_refined(small_grid, pilot_max_n=4, quantities=("grad_A",), rho_column="rho_gA",
                    correlation_at={2: 0.3, 4: 0.35, 16: 0.4})
    assert q.label_law and abs(q.rho_gap) < 1e-9
    cells = small_grid[(small_grid.layer == "__all__") & (small_grid.n_clients == 4)].groupby(
        ["rule", "rank"], as_index=False).alpha.mean()
    for k, c in ((2, 0.3), (4, 0.35), (16, 0.4)):
        model = np.mean([predicted_correlation(q, row.rule, [row.rank], [k], row.alpha)[0] for row in cells.itertuples()])
        assert model == pytest.approx(c, abs=1e-6)
    with pytest.raises(ValueError, match="not at K = \\[8\\]"):
        predict_points(q, "grad_A", "lora", [2], [8], [8], 16.0)
    # one client: no pair, the correlation does not enter
    assert predict_points(q, "grad_A", "lora", [2], [1], [1], 16.0) == pytest.approx(
        predict_points(replace_rho(q, 0.9), "grad_A", "lora", [2], [1], [1], 16.0))


def replace_rho(p, value):
    from dataclasses import replace

    return replace(p, rho_by_k=tuple((k, value) for k, _ in p.rho_by_k))


def test_refined_fits_take_each_k_from_the_label_law_fitted_on_the_pilot(small_grid):
    """By default the correlations of B's increments come from the label law, fitted on the pilot runs of
    both splits (the copy labelled Dirichlet is split by labels, so its batches are more concentrated),
    at every K of the grid (not rho_gB's, which keeps the K-law); an unknown law is an error."""
    from validation.analysis import label_law_targets

    skewed = small_grid.assign(partition="dirichlet")
    both = pd.concat([small_grid, skewed], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = refined_fits(both, pilot_max_n=2)
    laws, targets = label_law_targets(both, pilot_max_n=2)
    assert {c for _, c in laws} == {"rho_ratio", "rho_out", "rho_gA"}
    for part in ("iid", "dirichlet"):
        p = params[("ffa", "adamw", part, "update_fro")]
        assert p.label_law and dict(p.corr_by_k) == pytest.approx(targets[("ffa", part, "rho_ratio")])
        assert sorted(dict(p.corr_by_k)) == [2, 4]  # every K of the grid, beyond the pilot's N <= 2 too
    with pytest.raises(ValueError, match="correlation_law"):
        refined_fits(both, correlation_law="cubic")


def test_measured_correlation_targets_are_the_mean_at_each_k_of_the_counted_rows():
    """Hand computation: the mean over the AdamW ``__all__`` rows of round 1 at each K > 1; other layers, rounds,
    optimizers, diverged runs and K = 1 do not count, and a column with no value at a K has no entry there."""
    from validation.analysis import measured_correlation_targets

    base = dict(scheme="ffa", partition="iid", optimizer="adamw", round=1, layer="__all__", diverged=False,
                rho_ratio=np.nan, rho_out=np.nan, rho_gA=np.nan, rho_gB=np.nan)
    rows = pd.DataFrame([
        {**base, "n_participating": 4, "rho_ratio": 0.10, "rho_out": 0.5},
        {**base, "n_participating": 4, "rho_ratio": 0.30, "rho_out": 0.7},
        {**base, "n_participating": 16, "rho_ratio": -0.20},
        {**base, "n_participating": 16, "rho_ratio": 9.0, "layer": "q"},
        {**base, "n_participating": 16, "rho_ratio": 9.0, "round": 2},
        {**base, "n_participating": 16, "rho_ratio": 9.0, "optimizer": "sgd"},
        {**base, "n_participating": 16, "rho_ratio": 9.0, "diverged": True},
        {**base, "n_participating": 1, "rho_ratio": 9.0},
        {**base, "n_participating": 4, "rho_ratio": 0.05, "partition": "dirichlet"},
    ])
    got = measured_correlation_targets(rows)
    assert got[("ffa", "iid", "rho_ratio")] == pytest.approx({4: 0.20, 16: -0.20})
    assert got[("ffa", "iid", "rho_out")] == pytest.approx({4: 0.60})
    assert got[("ffa", "dirichlet", "rho_ratio")] == pytest.approx({4: 0.05})
    assert ("ffa", "iid", "rho_gA") not in got


def test_label_law_applies_only_where_its_premises_hold(small_grid):
    """Equal weights and full participation (else the K-law, with a warning), the round asked for, and at
    least one K > 1 to reproduce."""
    from validation.analysis import label_law_targets

    both = pd.concat([small_grid, small_grid.assign(partition="dirichlet")], ignore_index=True)
    assert label_law_targets(both, pilot_max_n=2)[0]
    assert label_law_targets(both, pilot_max_n=2, rnd=2) == ({}, {})  # no runs of that round: no law
    with pytest.warns(UserWarning, match="full participation"):
        assert label_law_targets(both.assign(weighted=True), pilot_max_n=2) == ({}, {})
    with pytest.warns(UserWarning, match="full participation"):
        assert label_law_targets(both.assign(n_participating=1), pilot_max_n=2) == ({}, {})
    with pytest.raises(ValueError, match="some K > 1"):
        fit_refined(small_grid, pilot_max_n=4, quantities=("update_fro",), correlation_at={1: 0.2})


def test_a_measured_f_in_is_held_and_only_phi_and_lambda_are_fitted(small_grid):
    p = fit_refined(small_grid, pilot_max_n=2, f_in=0.123)
    assert p.f_in == 0.123 and 0 <= p.phi <= 0.5 and p.lam > 0
    free = fit_refined(small_grid, pilot_max_n=2)
    assert free.rms_log_residual <= p.rms_log_residual + 1e-9  # holding a parameter cannot fit the pilot better
    with pytest.raises(ValueError, match="f_in"):
        fit_refined(small_grid, pilot_max_n=2, f_in=0.7)


def test_measured_f_in_is_the_pilot_mean_of_the_increments_coherent_share(small_grid):
    from validation.analysis import measured_f_in
    from validation.metrics import ALL

    rows = small_grid.assign(optimizer="adamw")
    pilot = rows[(rows.layer == ALL) & (rows.n_clients <= 2)]
    got = measured_f_in(rows, pilot_max_n=2)
    assert set(got) == {(str(pilot.scheme.iloc[0]), "iid")}
    assert got[(str(pilot.scheme.iloc[0]), "iid")] == pytest.approx(min(max(pilot.inc_B_coherent.mean(), 0), 0.5))
    spoiled = rows.copy()
    spoiled.loc[spoiled.n_clients > 2, "inc_B_coherent"] = 0.4  # beyond the pilot: must not count
    assert measured_f_in(spoiled, pilot_max_n=2) == got
    high = rows.assign(inc_B_coherent=0.8)
    with pytest.warns(UserWarning, match="clipped"):
        assert set(measured_f_in(high, pilot_max_n=2).values()) == {0.5}
    with pytest.raises(ValueError, match="inc_B_coherent"):
        measured_f_in(rows.drop(columns="inc_B_coherent"))
    probe = measured_f_in(rows.assign(inc_B_coherent_probe=0.25), pilot_max_n=2, column="inc_B_coherent_probe")
    assert set(probe.values()) == {0.25}
    with pytest.raises(ValueError, match="column must be"):
        measured_f_in(rows, column="inc_B_rms")
    fits = refined_fits(rows, pilot_max_n=2, nu=0.0, f_in=got)
    assert fits and {p.f_in for p in fits.values()} == set(got.values())


def test_a_saturating_fit_meets_the_shared_curvature_at_the_shared_step(small_grid):
    """``curvature_law="saturating"``: the shared part's curvature is lambda / (1 + step / t0) at each point, step the root of the
    derived shared output there; the update's own size does not see it. The fit starts from one curvature's optimum,
    so its pilot misfit is never larger."""
    from dataclasses import replace

    from sfed_theory.montecarlo import ModelParams
    from sfed_theory.predict import expected_value
    from sfed_theory.rules import scaling_factor
    from validation.refined import RefinedParams

    fitted = fit_refined(small_grid, pilot_max_n=2, curvature_law="saturating")
    one = fit_refined(small_grid, pilot_max_n=2)
    assert not one.saturating and fitted.rms_log_residual <= one.rms_log_residual + 1e-12
    r, n = 4, 4
    s_b, s_da = fitted.s_B["sfed"], fitted.s_dA["sfed"] or fitted.s_B["sfed"]
    model = ModelParams(d=fitted.d, k=fitted.k, r=r, n_clients=n, gamma=scaling_factor("sfed", 16.0, r, n),
                        rho=fitted.rho, s_A=1 / math.sqrt(3 * fitted.k), s_B=s_b, s_dA=s_da,
                        tau=math.sqrt(fitted.tau2x2[r]), x_norm2=1.0, f_in=0.3, phi=0.4, nu=fitted.nu)
    step = math.sqrt(expected_value("shared_output", fitted.scheme, "adam-refined", model))
    assert step > 0
    p = replace(fitted, f_in=0.3, phi=0.4, lam=3.0, t0=0.5 * step)  # the shared part meets lambda / 3
    assert p.saturating and "t0=" in p.describe() and RefinedParams.from_row(p.to_row()) == p
    for q in ("grad_A", "grad_B"):
        want = predicted_norm(q, "sfed", regime="adam-refined", scheme=p.scheme, rank=r, n_clients=n, alpha=16.0,
                              rho=p.rho, d=p.d, k=p.k, s_A=1 / math.sqrt(3 * p.k), s_B=s_b, s_dA=s_da,
                              tau=math.sqrt(p.tau2x2[r]), x_norm2=1.0, f_in=p.f_in, phi=p.phi, lam=p.lam, nu=p.nu,
                              lam_s=p.lam / 3)
        assert predict_points(p, q, "sfed", [r], [n], [n], 16.0)[0] == pytest.approx(want, rel=1e-10), q
        one_curvature = predict_points(replace(p, t0=math.inf), q, "sfed", [r], [n], [n], 16.0)[0]
        assert one_curvature != pytest.approx(want, rel=1e-6), q
    update = [predict_points(v, "update_fro", "sfed", [r], [n], [n], 16.0)[0] for v in (p, replace(p, t0=math.inf))]
    assert update[0] == update[1]


def test_a_rank_curvature_fit_meets_lambda_times_the_rank_law_at_each_rank(small_grid):
    """``curvature_law="rank"``: at rank r the whole update meets lambda (r/16)^lam_rank (both curvature slots), so
    each prediction is the closed form's at that rank's own curvature; lam_rank = 0 is the one-curvature model. The
    fit starts from that model's optimum, so its pilot misfit is never larger; an unknown law is refused."""
    from dataclasses import replace

    from validation.refined import CURVATURE_REFERENCE_RANK, RefinedParams

    fitted = fit_refined(small_grid, pilot_max_n=2, curvature_law="rank")
    one = fit_refined(small_grid, pilot_max_n=2)
    assert one.lam_rank == 0.0 and fitted.rms_log_residual <= one.rms_log_residual + 1e-12
    with pytest.raises(ValueError, match="curvature_law must be one of"):
        fit_refined(small_grid, pilot_max_n=2, curvature_law="rank+saturating")
    p = replace(fitted, f_in=0.3, phi=0.4, lam=2.0, lam_rank=0.8)
    assert "lam_rank=0.800" in p.describe() and RefinedParams.from_row(p.to_row()) == p
    assert p.curvature(CURVATURE_REFERENCE_RANK) == pytest.approx(2.0)
    s_b, s_da = p.s_B["sfed"], p.s_dA["sfed"] or p.s_B["sfed"]
    for r in (2, 4):
        lam_r = 2.0 * (r / 16) ** 0.8
        assert p.curvature(r) == pytest.approx(lam_r, rel=1e-12)
        for q in ("grad_A", "grad_B", "adapter_output"):
            want = predicted_norm(q, "sfed", regime="adam-refined", scheme=p.scheme, rank=r, n_clients=4, alpha=16.0,
                                  rho=p.rho, d=p.d, k=p.k, s_A=1 / math.sqrt(3 * p.k), s_B=s_b, s_dA=s_da,
                                  tau=math.sqrt(p.tau2x2[r]), x_norm2=1.0, f_in=p.f_in, phi=p.phi, lam=lam_r, nu=p.nu)
            assert predict_points(p, q, "sfed", [r], [4], [4], 16.0)[0] == pytest.approx(want, rel=1e-10), (q, r)
        flat = replace(p, lam_rank=0.0)
        if r != CURVATURE_REFERENCE_RANK:  # the law moves the gradients, which see the curvature
            assert predict_points(flat, "grad_B", "sfed", [r], [4], [4], 16.0)[0] != pytest.approx(
                predict_points(p, "grad_B", "sfed", [r], [4], [4], 16.0)[0], rel=1e-6)


def test_a_slope_at_a_rank_without_a_pilot_curvature_is_nan_with_a_warning(small_grid):
    """fit_exponents' refined slope: the measured law has no curvature at a rank the pilot did not run, so no number
    (NaN and a warning naming the point), never an extrapolated one; a rank it has gives the model's slope."""
    from validation.analysis import _refined_slope
    from validation.refined import predicted_slope

    table = {("lora", 2): 0.02, ("lora", 4): 0.05, ("sfed", 2): 0.03, ("sfed", 4): 0.04}
    p = fit_refined(small_grid, pilot_max_n=2, curvature_law="measured", curvature=table)
    assert _refined_slope(p, "grad_B", "lora", "rank", [2, 4], 4, 4, 16.0) == predicted_slope(
        p, "grad_B", "lora", "rank", [2, 4], 4, 4, 16.0)
    with pytest.warns(UserWarning, match="no measured pilot curvature at .*'lora', 8"):
        assert math.isnan(_refined_slope(p, "grad_B", "lora", "rank", [2, 8], 4, 4, 16.0))
    assert math.isnan(_refined_slope(p, "grad_B", "rslora", "rank", [2, 4], 4, 4, 16.0))  # a rule it was not fitted on
    assert math.isnan(_refined_slope(None, "grad_B", "lora", "rank", [2, 4], 4, 4, 16.0))


def test_a_group_without_a_measured_curvature_keeps_a_prediction_with_one_curvature(small_grid):
    """refined_fits' measured law on runs that did not measure the curvature: one curvature for that group, with a
    warning, rather than no prediction at all."""
    with pytest.warns(UserWarning, match="no measured curvature.*one curvature"):
        params = refined_fits(small_grid.assign(curvature=np.nan), pilot_max_n=2, correlation_law="k",
                              curvature_law="measured")
    assert params and all(p.curvature_measured == () and p.lam_rank == 0.0 and not p.saturating
                          for p in params.values())


def test_a_measured_curvature_sets_lambda_so_the_models_secant_is_the_pilots(small_grid):
    """``curvature_law="measured"``: at each point lambda = lam kappa_pilot(rule, r) / (E<dW C_g, dW> / E||dW||^2), the latter from
    the output moment at z with the gradient's bulk over the update's size; so each prediction is the closed form's
    at that lambda (computed here through predicted_norm), and the model's secant curvature is lam kappa_pilot."""
    from dataclasses import replace

    from validation.analysis import measured_curvature
    from validation.refined import RefinedParams
    from validation.secant_curvature import model_secant_curvature

    table = {("lora", 2): 0.02, ("lora", 4): 0.05, ("sfed", 2): 0.03, ("sfed", 4): 0.04}
    fitted = fit_refined(small_grid, pilot_max_n=2, curvature_law="measured", curvature=table)
    assert fitted.curvature_measured == (("lora", 2, 0.02), ("lora", 4, 0.05), ("sfed", 2, 0.03), ("sfed", 4, 0.04))
    assert RefinedParams.from_row(fitted.to_row()) == fitted and "sfed@4" in fitted.describe()
    for law, given in (("measured", None), ("rank", table), ("one", table)):  # the table goes with its law only
        with pytest.raises(ValueError, match="takes the pilot's table"):
            fit_refined(small_grid, pilot_max_n=2, curvature_law=law, curvature=given)
    p = replace(fitted, f_in=0.3, phi=0.4, lam=2.0, nu_g=0.5, kappa=0.7)
    s_b, s_da = p.s_B["sfed"], p.s_dA["sfed"] or p.s_B["sfed"]
    n = 4
    for r in (2, 4):
        common = dict(regime="adam-refined", scheme=p.scheme, rank=r, n_clients=n, alpha=16.0, rho=p.rho, d=p.d,
                      k=p.k, s_A=1 / math.sqrt(3 * p.k), s_B=s_b, s_dA=s_da, tau=math.sqrt(p.tau2x2[r]), x_norm2=1.0,
                      f_in=p.f_in, phi=p.phi)
        response = predicted_norm("adapter_output", "sfed", nu=0.5, kappa=1.0, **common) ** 2
        size = predicted_norm("update_fro", "sfed", nu=0.5, kappa=1.0, **common) ** 2
        lam_r = 2.0 * table[("sfed", r)] / (response / size)
        for q in ("grad_A", "grad_B"):
            want = predicted_norm(q, "sfed", nu=p.nu, kappa=0.7, nu_g=0.5, lam=lam_r, **common)
            assert predict_points(p, q, "sfed", [r], [n], [n], 16.0)[0] == pytest.approx(want, rel=1e-10), (q, r)
        assert model_secant_curvature(p, "sfed", [r], [n], [n], 16.0)[0] == pytest.approx(2.0 * table[("sfed", r)])
    with pytest.raises(ValueError, match="no measured pilot curvature"):
        predict_points(p, "grad_B", "sfed", [8], [n], [n], 16.0)
    rows = small_grid.assign(curvature=np.where(small_grid.n_clients > 2, 99.0, small_grid["rank"] * 0.01))
    assert measured_curvature(rows, 2) == pytest.approx({(u, r): 0.01 * r for u in ("lora", "sfed") for r in (2, 4)})
    with pytest.raises(ValueError, match="no measured curvature"):
        measured_curvature(rows.assign(curvature=np.nan), 2)


def test_label_law_targets_are_reproduced_at_every_k_under_the_measured_curvature(small_grid):
    """Under the measured curvature law lambda follows the update's response, which changes with rho: the client
    and mean moments are then no polynomials in rho, and the solved correlation must still reproduce the target at
    every K (a cubic read off four nodes missed it, by 0.14 at K = 16 on the stored check's FedIT dL/dA)."""
    from validation.refined import predicted_correlation

    table = {("lora", 2): 0.02, ("lora", 4): 0.05, ("sfed", 2): 0.03, ("sfed", 4): 0.04}
    targets = {2: 0.3, 4: 0.35, 16: 0.4}
    q = fit_refined(small_grid, pilot_max_n=4, quantities=("grad_A",), rho_column="rho_gA", correlation_at=targets,
                    curvature_law="measured", curvature=table)
    assert q.curvature_measured and abs(q.rho_gap) < 1e-3  # the fit's gap: the largest miss it knows of
    cells = small_grid[(small_grid.layer == "__all__") & (small_grid.n_clients == 4)].groupby(
        ["rule", "rank"], as_index=False).alpha.mean()
    for k, c in targets.items():
        model = np.mean([predicted_correlation(q, row.rule, [row.rank], [k], row.alpha)[0] for row in cells.itertuples()])
        assert abs(model - c) <= abs(q.rho_gap) + 1e-6, (k, model, c)
