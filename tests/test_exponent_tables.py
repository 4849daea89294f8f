"""The stored exponent tables: slopes over the check's own grid, the refined model fitted with its pilot runs."""

from __future__ import annotations

import pandas as pd
import pytest

from paper_figures import exponent_tables
from test_harness_helpers import synth
from validation.federated import run


@pytest.fixture(scope="module")
def check_and_pilot() -> tuple[pd.DataFrame, pd.DataFrame]:
    def grid(ns):
        return pd.concat([run(synth(rule=rule, n_clients=n, rank=r, seed=s, rounds=1, partition="iid"))
                          for rule in ("lora", "sfed") for n in ns for r in (2, 4) for s in (0, 1)], ignore_index=True)

    return grid((1, 4, 8)), grid((2,))


def test_slopes_are_over_the_checks_grid_and_the_pilot_includes_the_extra_runs(check_and_pilot, monkeypatch, tmp_path):
    check, two = check_and_pilot
    monkeypatch.setattr(exponent_tables, "load", lambda name, results: {"gradient_check": check,
                                                                        "gradient_check_two_clients": two}[name])
    paths = exponent_tables.write_tables("gradient_check", tmp_path, n_boot=20)
    fits, params = pd.read_csv(paths[0]), pd.read_csv(paths[1])
    in_n = fits[fits.wrt == "n_clients"]
    assert set(in_n.points) == {"1,4,8"}  # the N = 2 runs do not enter a measured slope ...
    assert set(fits[fits.wrt == "rank"].fixed) == {"N=1", "N=4", "N=8"}
    assert set(params.pilot_ks.astype(str)) == {"2,4"}  # ... only the refined model's pilot
    assert fits.predicted_refined.notna().any()
    with pytest.raises(ValueError, match="unknown check"):
        exponent_tables.exponent_table("scaling", tmp_path)


def test_a_check_without_extra_runs_fits_on_its_own_pilot(check_and_pilot, monkeypatch, tmp_path):
    check, _ = check_and_pilot
    monkeypatch.setattr(exponent_tables, "load", lambda name, results: {"gradient_check_one_step": check}[name])
    paths = exponent_tables.write_tables("gradient_check_one_step", tmp_path, n_boot=20)
    fits, params = pd.read_csv(paths[0]), pd.read_csv(paths[1])
    assert set(params.pilot_ks.astype(str)) == {"4"}  # N <= 4 of its own grid: K = 4 only
    assert fits.predicted_refined.notna().any()


def test_the_input_bulk_comes_from_the_runs_or_from_the_stored_probe_table(check_and_pilot, monkeypatch, tmp_path):
    from paper_figures.probe_input_table import PROBE_SETTINGS, TABLE
    from validation.analysis import ALL
    from validation.probe_inputs import bulk_nu

    check, _ = check_and_pilot
    stored = {"gradient_check_one_step": check}
    monkeypatch.setattr(exponent_tables, "load", lambda name, results: stored[name])
    _, params = exponent_tables.exponent_table("gradient_check_one_step", tmp_path, n_boot=20)
    rows = check[(check.layer == ALL) & (check["round"] == 1)]
    want = bulk_nu(float(rows.probe_top_share.mean()), int(rows.k_in.iloc[0]))
    assert {round(p.nu, 12) for p in params.values()} == {round(want, 12)}  # the runs' own measurement
    stored["gradient_check_one_step"] = check.drop(columns="probe_top_share")  # stored before the column
    with pytest.raises(ValueError, match="missing"):
        exponent_tables.exponent_table("gradient_check_one_step", tmp_path, n_boot=20)
    table = pd.DataFrame({"seed": [0, 0], "layer": ["a", "b"], "k": [384, 384], "n_tokens": [8, 8],
                          "top_share": [0.1, 0.2], "mean_token_share": [0.1, 0.1]})
    settings = {f: str(check[f].iloc[0]) for f in PROBE_SETTINGS}  # the probe the runs were made with
    table.assign(**settings).to_csv(tmp_path / TABLE, index=False)
    _, params = exponent_tables.exponent_table("gradient_check_one_step", tmp_path, n_boot=20)
    assert {round(p.nu, 12) for p in params.values()} == {round(bulk_nu(0.15, 384), 12)}
    table.assign(**settings).assign(probe_size="128").to_csv(tmp_path / TABLE, index=False)
    with pytest.raises(ValueError, match="probe settings"):
        exponent_tables.exponent_table("gradient_check_one_step", tmp_path, n_boot=20)


def test_measured_f_in_holds_the_pilots_coherent_share(check_and_pilot, monkeypatch, tmp_path):
    """``--f-in top|probe``: every refined fit holds f_in at the coherent-share runs' pilot mean of that
    measurement, and the tables go to their own files beside the fitted ones."""
    from validation.analysis import measured_f_in
    from validation.probe_inputs import bulk_nu

    check, two = check_and_pilot
    coherent = check[check.n_clients <= 4].assign(optimizer="adamw")
    coherent = coherent.assign(inc_B_coherent_probe=coherent.inc_B_coherent + 0.05)  # tell the columns apart
    stored = {"gradient_check": check, "gradient_check_two_clients": two, "gradient_check_coherent": coherent}
    monkeypatch.setattr(exponent_tables, "load", lambda name, results: stored[name])
    for choice, column in (("top", "inc_B_coherent"), ("probe", "inc_B_coherent_probe"), ("grad", "inc_B_coherent_grad")):
        paths = exponent_tables.write_tables("gradient_check", tmp_path, n_boot=20, f_in=choice)
        assert [p.name for p in paths] == [f"gradient_check_f_in_{choice}_exponents.csv",
                                           f"gradient_check_f_in_{choice}_refined_params.csv"]
        want = set(measured_f_in(coherent, column=column).values())
        params = pd.read_csv(paths[1])
        assert set(params.f_in.round(12)) == {round(v, 12) for v in want}
        if choice == "grad":  # the model's x is the gradient's input direction: nu from the tokens' share along it
            rows = coherent.query("layer == '__all__'")
            want_nu = bulk_nu(rows.grad_input_share.mean(), int(rows.k_in.iloc[0]))
            assert set(params.nu.round(12)) == {round(want_nu, 12)}
            assert want_nu != pytest.approx(bulk_nu(rows.probe_top_share.mean(), int(rows.k_in.iloc[0])))
    with pytest.raises(ValueError, match="no measured f_in"):
        exponent_tables.exponent_table("gradient_check_one_step", tmp_path, f_in="top")
    with pytest.raises(ValueError, match="f_in must be"):
        exponent_tables.exponent_table("gradient_check", tmp_path, f_in="measured")


def test_two_vectors_fit_at_the_pilots_measured_angle(check_and_pilot, monkeypatch, tmp_path):
    """``--two-vectors``: every refined fit takes kappa from the coherent-share runs' pilot (the root mean square
    of the per-layer |cos| of the gradient's direction with the spike) and nu_g from the tokens' share along the
    gradient's direction, keeps the check's own nu for the output, and writes its own files."""
    import numpy as np

    from validation.probe_inputs import bulk_nu

    check, two = check_and_pilot
    coherent = check[check.n_clients <= 4].assign(optimizer="adamw")
    stored = {"gradient_check": check, "gradient_check_two_clients": two, "gradient_check_coherent": coherent}
    monkeypatch.setattr(exponent_tables, "load", lambda name, results: stored[name])
    paths = exponent_tables.write_tables("gradient_check", tmp_path, n_boot=20, two_vectors=True)
    assert [p.name for p in paths] == ["gradient_check_two_vectors_exponents.csv",
                                       "gradient_check_two_vectors_refined_params.csv"]
    params = pd.read_csv(paths[1])
    per_layer = coherent[(coherent.layer != "__all__") & (coherent["round"] == 1)].grad_spike_cos
    want = float(np.sqrt(np.mean(per_layer.to_numpy() ** 2)))
    assert 0.0 < want < 1.0
    assert set(params.kappa.round(12)) == {round(want, 12)}
    _, one = exponent_tables.exponent_table("gradient_check", tmp_path, n_boot=20)
    assert {round(p.nu, 12) for p in one.values()} == set(params.nu.round(12))  # the spike's bulk, as by default
    assert {p.kappa for p in one.values()} == {1.0} and {p.nu_g for p in one.values()} == {None}
    rows = coherent.query("layer == '__all__'")
    want_nu_g = bulk_nu(rows.grad_input_share.mean(), int(rows.k_in.iloc[0]))
    assert set(params.nu_g.round(12)) == {round(want_nu_g, 12)} and want_nu_g not in set(params.nu)
    _, held = exponent_tables.exponent_table("gradient_check", tmp_path, n_boot=20, f_in="grad", two_vectors=True)
    assert {p.nu for p in held.values()} == {p.nu for p in one.values()}  # the output keeps the spike's bulk
    with pytest.raises(ValueError, match="no measured f_in or kappa"):
        exponent_tables.exponent_table("gradient_check_one_step", tmp_path, two_vectors=True)


def test_a_pilot_over_every_n_makes_each_slope_in_sample_and_writes_its_own_files(check_and_pilot, monkeypatch,
                                                                                    tmp_path):
    """``--pilot-max-n``: the fit sees the largest N too (a ceiling of the model's form), its slopes are all
    labelled in-sample, and its tables go beside the predictions' rather than over them."""
    check, two = check_and_pilot
    monkeypatch.setattr(exponent_tables, "load", lambda name, results: {"gradient_check": check,
                                                                        "gradient_check_two_clients": two}[name])
    default = exponent_tables.write_tables("gradient_check", tmp_path, n_boot=20)
    every = exponent_tables.write_tables("gradient_check", tmp_path, n_boot=20, pilot_max_n=8)
    assert [p.name for p in every] == ["gradient_check_pilot_n8_exponents.csv",
                                       "gradient_check_pilot_n8_refined_params.csv"]
    fits, params = pd.read_csv(every[0]), pd.read_csv(every[1])
    before, before_params = pd.read_csv(default[0]), pd.read_csv(default[1])
    assert set(before.refined_sample) == {"in", "out"} and set(fits.refined_sample) == {"in"}
    assert set(params.pilot_max_n) == {8} and set(before_params.pilot_max_n) == {4}
    assert "4,8" in set(params.pilot_ks.astype(str)) or "2,4,8" in set(params.pilot_ks.astype(str))
    assert not fits.predicted_refined.equals(before.predicted_refined)  # the N = 8 runs entered the fit
    with pytest.raises(ValueError, match="pilot_max_n"):
        exponent_tables.exponent_table("gradient_check", tmp_path, pilot_max_n=0)


def test_one_rule_is_fitted_and_tabulated_on_its_own_runs(check_and_pilot, monkeypatch, tmp_path):
    """``--rule``: the table holds that rule's slopes alone, its fit sees that rule's pilot points alone (fewer than
    the fit over every rule, and other parameters), the measured inputs are the whole check's, and a rule the check
    never ran is an error."""
    check, two = check_and_pilot
    monkeypatch.setattr(exponent_tables, "load", lambda name, results: {"gradient_check": check,
                                                                        "gradient_check_two_clients": two}[name])
    every = exponent_tables.write_tables("gradient_check", tmp_path, n_boot=20)
    alone = exponent_tables.write_tables("gradient_check", tmp_path, n_boot=20, rule="sfed")
    assert [p.name for p in alone] == ["gradient_check_rule_sfed_exponents.csv",
                                       "gradient_check_rule_sfed_refined_params.csv"]
    fits, params = pd.read_csv(alone[0]), pd.read_csv(alone[1])
    all_fits, all_params = pd.read_csv(every[0]), pd.read_csv(every[1])
    assert set(fits.rule) == {"sfed"} and set(all_fits.rule) == {"lora", "sfed"}
    keys = ["scheme", "partition", "rule", "quantity", "wrt", "fixed_value"]
    same = fits.merge(all_fits, on=keys, suffixes=("", "_all"))
    assert len(same) == len(fits) and (same.measured == same.measured_all).all()  # the same runs, the same slopes
    assert (params.n_pilot_points < all_params.n_pilot_points).all()  # lora's pilot points left out of the fit
    assert not same.predicted_refined.equals(same.predicted_refined_all)
    assert set(params.nu.round(12)) == set(all_params.nu.round(12))  # the inputs measured on every rule's runs
    with pytest.raises(ValueError, match="no 'rslora' runs"):
        exponent_tables.exponent_table("gradient_check", tmp_path, rule="rslora")


def test_one_rule_keeps_the_rslora_runs_that_stand_for_its_single_client():
    """A rule the grid ran only at N > 1 gets rsLoRA's N = 1 runs (the same runs: gamma is rsLoRA's at N = 1)."""
    rows = pd.DataFrame({"rule": ["rslora", "rslora", "sfed", "lora"], "n_clients": [1, 4, 4, 1], "v": [1, 2, 3, 4]})
    sfed = exponent_tables._one_rule(rows, "sfed")
    assert sorted(zip(sfed.n_clients, sfed.v)) == [(1, 1), (4, 3)]
    assert exponent_tables._one_rule(rows, None) is rows


def test_a_rank_law_for_the_curvature_goes_to_its_own_tables(check_and_pilot, monkeypatch, tmp_path):
    """``--rank-curvature``: the fits carry their own rank exponent, written beside the one-curvature tables and
    read back by the secant-curvature table; an unknown law is refused, and the CLI takes one law at a time."""
    from paper_figures.secant_curvature_table import secant_table

    check, _ = check_and_pilot
    monkeypatch.setattr(exponent_tables, "load", lambda name, results: {"gradient_check_one_step": check}[name])
    paths = exponent_tables.write_tables("gradient_check_one_step", tmp_path, n_boot=20, curvature_law="rank")
    assert [p.name for p in paths] == ["gradient_check_one_step_rank_curvature_exponents.csv",
                                       "gradient_check_one_step_rank_curvature_refined_params.csv"]
    assert "lam_rank" in pd.read_csv(paths[1])
    with pytest.raises(ValueError, match="curvature_law must be one of"):
        exponent_tables.exponent_table("gradient_check_one_step", tmp_path, n_boot=20, curvature_law="ranked")
    with pytest.raises(SystemExit):
        exponent_tables.main(["--checks", "gradient_check_one_step", "--rank-curvature", "--saturating"])
    monkeypatch.setattr("paper_figures.secant_curvature_table.load", lambda name, results: check)
    monkeypatch.setattr("paper_figures.secant_curvature_table.fitted_rows", lambda name, results: check)
    secant = secant_table("gradient_check_one_step_rank_curvature", tmp_path, n_boot=20)
    assert set(secant.fitted_on) == {"grad_A", "grad_B"} and set(secant.rule) == {"lora", "sfed"}
    assert (secant.model - secant.model_geometry - secant.lam_rank).abs().max() < 1e-9
    with pytest.raises(ValueError, match="no parameters"):
        secant_table("gradient_check_one_step_saturating", tmp_path)


def test_the_measured_curvature_goes_to_its_own_tables(check_and_pilot, monkeypatch, tmp_path):
    """``--measured-curvature``: every fit carries the pilot's curvature per (rule, rank) of its own runs."""
    from validation.analysis import measured_curvature

    check, _ = check_and_pilot
    monkeypatch.setattr(exponent_tables, "load", lambda name, results: {"gradient_check_one_step": check}[name])
    paths = exponent_tables.write_tables("gradient_check_one_step", tmp_path, n_boot=20, curvature_law="measured")
    assert [p.name for p in paths] == ["gradient_check_one_step_measured_curvature_exponents.csv",
                                       "gradient_check_one_step_measured_curvature_refined_params.csv"]
    from validation.refined import RefinedParams

    want = tuple(sorted((u, r, c) for (u, r), c in measured_curvature(check, 4).items()))
    stored = pd.read_csv(paths[1], dtype={"fitted_on": str, "pilot_ks": str}).to_dict("records")
    assert stored and all(RefinedParams.from_row(row).curvature_measured == want for row in stored)
    with pytest.raises(SystemExit):
        exponent_tables.main(["--checks", "gradient_check_one_step", "--measured-curvature", "--saturating"])


def test_the_measured_correlation_goes_to_its_own_tables_with_every_slope_in_sample(check_and_pilot, monkeypatch,
                                                                                   tmp_path):
    """``--measured-correlation`` (a diagnostic): each fit meets the correlation measured at every K of the grid,
    N = 8 beyond the pilot included, and no slope is labelled a prediction."""
    from validation.analysis import measured_correlation_targets
    from validation.refined import RefinedParams

    check, _ = check_and_pilot
    monkeypatch.setattr(exponent_tables, "load", lambda name, results: {"gradient_check_one_step": check}[name])
    paths = exponent_tables.write_tables("gradient_check_one_step", tmp_path, n_boot=20, correlation_law="measured")
    assert [p.name for p in paths] == ["gradient_check_one_step_measured_correlation_exponents.csv",
                                       "gradient_check_one_step_measured_correlation_refined_params.csv"]
    fits = pd.read_csv(paths[0])
    assert fits.predicted_refined.notna().any() and set(fits.refined_sample) == {"in"}
    targets = measured_correlation_targets(check)
    stored = pd.read_csv(paths[1], dtype={"fitted_on": str, "pilot_ks": str}).to_dict("records")
    assert stored
    for row in stored:
        p = RefinedParams.from_row(row)
        assert sorted(dict(p.corr_by_k)) == [4, 8]
        assert dict(p.corr_by_k) == pytest.approx(targets[(p.scheme, p.partition, p.rho_column)])


def test_every_curvature_law_has_its_own_file_name_part():
    """A law added to the refined model without a stem here would fail only after its whole fit; distinct stems keep
    one law's tables from overwriting another's."""
    from validation.refined import CURVATURE_LAWS

    assert set(exponent_tables.CURVATURE_STEMS) == set(CURVATURE_LAWS)
    assert len(set(exponent_tables.CURVATURE_STEMS.values())) == len(CURVATURE_LAWS)
