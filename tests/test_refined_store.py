"""Refined parameters on disk: read back exactly, and only for the rows they were fitted on."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from validation.refined import RefinedParams
from validation.refined_store import fingerprint, read_params, stored_or_fitted, write_params

FROBENIUS = RefinedParams("ffa", "iid", 0.21, 0.49, 0.0207, 3.1e-6, {4: 0.0018331234567, 16: 0.002035},
                          {"lora": 0.0015621234567, "sfed": 0.001549}, {"lora": 0.00074261, "sfed": 0.0007439},
                          384, 384, 4, 27, 0.0234, ("update_fro",), "rho_ratio", 0.013, None, 0.0, (2, 4),
                          nu=0.0167149365)
LABEL_LAW = RefinedParams("fedit", "dirichlet", 0.5, 0.1066, 0.0239, 6.7e-6, {4: 0.0018, 64: 0.0021},
                          {"rslora": 0.00155}, {"rslora": 0.00074}, 384, 384, 4, 27, 0.0101, ("grad_A",), "rho_gA",
                          0.0, None, -0.002, (2, 4), ((2, -0.0234), (4, 7.355e-05), (16, 0.01997)),
                          ((2, -0.1534), (4, -0.1065), (16, -0.06667)), nu=0.0167, kappa=0.59, nu_g=0.037)
RESULTS = Path(__file__).resolve().parents[1] / "results"
ROWS = pd.DataFrame({"rank": [4, 16, 64], "n_clients": [1, 4, 16], "grad_A_end": [0.1, 0.2, 0.3]})
KEYS = {("ffa", "adamw", "iid", "update_fro"): FROBENIUS, ("fedit", "adamw", "dirichlet", "grad_A"): LABEL_LAW}


@pytest.mark.parametrize("p", [FROBENIUS, LABEL_LAW], ids=["frobenius", "label-law"])
def test_a_row_reads_back_to_the_same_parameters(p, tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame([p.to_row()]).to_csv(path, index=False)  # through a CSV, as the tables store them
    back = RefinedParams.from_row(pd.read_csv(path).to_dict("records")[0])
    assert back == p
    assert back.rho == pytest.approx(p.rho, nan_ok=True)


def test_rows_written_before_a_field_existed_take_its_default():
    row = FROBENIUS.to_row()
    for later in ("kappa", "nu_g", "nu"):
        row.pop(later)
    back = RefinedParams.from_row(row)
    assert (back.kappa, back.nu_g, back.nu) == (1.0, None, 0.0)


def test_the_fingerprint_ignores_row_order_and_sees_any_changed_value():
    assert fingerprint(ROWS) == fingerprint(ROWS.iloc[::-1])
    assert fingerprint(ROWS) == fingerprint(ROWS.set_index("rank", drop=False))
    changed = ROWS.copy()
    changed.loc[1, "grad_A_end"] = 0.2000001
    assert fingerprint(changed) != fingerprint(ROWS)
    assert fingerprint(ROWS.rename(columns={"grad_A_end": "grad_B_end"})) != fingerprint(ROWS)
    assert fingerprint(ROWS.iloc[:2]) != fingerprint(ROWS)


def test_parameters_are_read_back_only_for_the_rows_they_were_fitted_on(tmp_path):
    path = write_params(KEYS, tmp_path / "refined_params.csv", ROWS)
    assert read_params(path, ROWS) == KEYS
    assert read_params(path, ROWS.iloc[:2]) is None
    assert read_params(tmp_path / "absent.csv", ROWS) is None
    pd.read_csv(path).drop(columns="fitted_on").to_csv(path, index=False)  # a table from before the fingerprint
    assert read_params(path, ROWS) is None


def test_stored_or_fitted_fits_only_when_the_store_does_not_match(tmp_path):
    path = write_params(KEYS, tmp_path / "refined_params.csv", ROWS)

    def must_not_fit():
        raise AssertionError("fitted although the stored parameters match")

    assert stored_or_fitted(ROWS, path, must_not_fit) == KEYS
    calls = []
    assert stored_or_fitted(ROWS.iloc[:2], path, lambda: calls.append(1) or {}) == {} and calls == [1]
    assert stored_or_fitted(ROWS, None, lambda: {"fitted": 1}) == {"fitted": 1}


def test_parameters_fitted_with_other_settings_are_not_read(tmp_path):
    path = write_params(KEYS, tmp_path / "refined_params.csv", ROWS)
    only_ffa = {k: v for k, v in KEYS.items() if k[0] == "ffa"}
    write_params(only_ffa, path, ROWS)
    assert read_params(path, ROWS, nu=FROBENIUS.nu, kappa=1.0, pilot_max_n=4) == only_ffa
    assert read_params(path, ROWS, nu=FROBENIUS.nu * 1.001) is None
    assert read_params(path, ROWS, kappa=0.59) is None
    assert read_params(path, ROWS, pilot_max_n=2) is None
    assert read_params(path, ROWS, nu=None) == only_ffa  # None: not compared


def test_a_single_pilot_k_and_a_nan_read_back_as_written(tmp_path):
    one_k = replace(FROBENIUS, pilot_ks=(4,))
    no_k = replace(FROBENIUS, partition="dirichlet", pilot_ks=(), rms_log_residual=float("nan"))
    keys = {("ffa", "adamw", "iid", "update_fro"): one_k, ("ffa", "adamw", "dirichlet", "update_fro"): no_k}
    back = read_params(write_params(keys, tmp_path / "p.csv", ROWS), ROWS)
    assert back[("ffa", "adamw", "iid", "update_fro")].pilot_ks == (4,)
    assert back[("ffa", "adamw", "dirichlet", "update_fro")].pilot_ks == ()
    assert math.isnan(back[("ffa", "adamw", "dirichlet", "update_fro")].rms_log_residual)  # not a default


def test_an_unparsable_table_is_refitted_not_raised(tmp_path):
    path = write_params(KEYS, tmp_path / "p.csv", ROWS)
    table = pd.read_csv(path, dtype=str)
    table.loc[0, "tau2x2"] = "4:not-a-number"
    table.to_csv(path, index=False)
    assert read_params(path, ROWS) is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_committed_default_fit_is_what_the_code_fits_now():
    # The figures and notebook 03 read results/gradient_check_refined_params.csv instead of refitting: refit one
    # group (FFA, IID: four quantities) from the committed rows and demand the same parameters, so a change to
    # the fit that leaves the stored table stale fails here.
    import warnings

    from paper_figures.exponent_tables import fitted_rows
    from paper_figures.probe_input_table import rows_nu
    from validation.analysis import refined_fits

    rows = fitted_rows("gradient_check", RESULTS)
    nu = rows_nu(rows, RESULTS)
    stored = read_params(RESULTS / "gradient_check_refined_params.csv", rows, nu=nu, kappa=1.0, pilot_max_n=4)
    assert stored is not None, "the committed table was fitted on other rows or settings: rewrite it"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refit = refined_fits(rows, nu=nu, only=("ffa", "iid"))
    assert len(refit) == 4
    for key, p in refit.items():
        s = stored[key]
        for name in ("f_in", "phi", "lam", "rho_f", "rho_skew", "rho_gap", "rms_log_residual"):
            assert getattr(s, name) == pytest.approx(getattr(p, name), rel=1e-6, abs=1e-12), (key, name)
        assert dict(s.rho_by_k) == pytest.approx(dict(p.rho_by_k), rel=1e-6)
        assert s.tau2x2 == pytest.approx(p.tau2x2, rel=1e-9)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_committed_figures_fit_is_what_the_code_fits_now():
    # The figures and notebook 03 show the README's model (two vectors, the pilot's measured curvature) from
    # results/gradient_check_two_vectors_measured_curvature_refined_params.csv: refit one group the same way.
    import warnings

    from paper_figures.experiments import load
    from paper_figures.exponent_tables import fitted_rows, two_vector_inputs
    from validation.analysis import refined_fits

    rows = fitted_rows("gradient_check", RESULTS)
    nu, kappa, nu_g = two_vector_inputs(rows, load("gradient_check_coherent", RESULTS), RESULTS)
    settings = dict(nu=nu, kappa=kappa, nu_g=nu_g, pilot_max_n=4)
    stored = read_params(RESULTS / "gradient_check_two_vectors_measured_curvature_refined_params.csv", rows, **settings)
    assert stored is not None, "the committed table was fitted on other rows or settings: rewrite it"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refit = refined_fits(rows, curvature_law="measured", only=("ffa", "iid"), **settings)
    assert len(refit) == 4
    for key, p in refit.items():
        s = stored[key]
        for name in ("f_in", "phi", "lam", "rho_f", "rho_skew", "rho_gap", "rms_log_residual"):
            assert getattr(s, name) == pytest.approx(getattr(p, name), rel=1e-6, abs=1e-12), (key, name)
        assert {(u, a): c for u, a, c in s.curvature_measured} == pytest.approx(
            {(u, a): c for u, a, c in p.curvature_measured}, rel=1e-9)
