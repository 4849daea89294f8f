"""The matched-step comparison: ratios of seed RMS against a hand computation, and its errors."""

import math

import pandas as pd
import pytest

from validation.matched_step import matched_step_ratios


def _rows(n, gamma, alpha, grads):
    return pd.DataFrame([{"scheme": "ffa", "partition": "iid", "rule": "sfed", "rank": 4, "n_clients": n,
                          "gamma": gamma, "alpha": alpha, "layer": "__all__", "round": 1, "diverged": False,
                          "seed": s, "grad_B_end": g, "grad_A_end": 2.0 * g} for s, g in grads.items()])


REFERENCE = pd.concat([_rows(4, 16.0, 16.0, {0: 3.0, 1: 4.0}), _rows(16, 32.0, 16.0, {0: 1.0, 1: 2.0, 2: 9.0})])
MATCHED = _rows(4, 32.0, 32.0, {0: 2.0, 1: 2.0})


def test_ratio_is_the_root_of_a_ratio_of_mean_squares_over_the_common_seeds():
    t = matched_step_ratios(REFERENCE, MATCHED, n_boot=200).set_index(["against", "column"])
    # seed 2 exists only in the reference and is left out; a mean of norms would give 4/3, not sqrt(8/5)
    assert t.loc[("same gamma", "grad_B_end"), "ratio"] == pytest.approx(math.sqrt(8 / 5))
    assert t.loc[("same N", "grad_B_end"), "ratio"] == pytest.approx(math.sqrt(8 / 25))
    assert t.loc[("same gamma", "grad_A_end"), "ratio"] == pytest.approx(math.sqrt(8 / 5))  # scale-free
    assert t.loc[("same N", "grad_B_end"), "per_gamma"] == pytest.approx(math.sqrt(8 / 25) * 16 / 32)
    assert t.loc[("same gamma", "grad_B_end"), "per_gamma"] == pytest.approx(math.sqrt(8 / 5))
    assert (t.n_seeds == 2).all()
    assert t.loc[("same gamma", "grad_B_end"), "ref_n_clients"] == 16
    assert t.loc[("same N", "grad_B_end"), "ref_gamma"] == 16.0
    assert not t.loc[("same N", "grad_B_end"), "inside"]  # every bootstrap draw lies below 1
    lo, hi = t.loc[("same N", "grad_B_end"), ["ci_low", "ci_high"]]
    assert lo <= t.loc[("same N", "grad_B_end"), "ratio"] <= hi


def test_a_matched_cell_without_its_reference_is_an_error():
    with pytest.raises(ValueError, match="same gamma"):
        matched_step_ratios(REFERENCE[REFERENCE.n_clients == 4], MATCHED)
    with pytest.raises(ValueError, match="same N"):
        matched_step_ratios(REFERENCE[REFERENCE.n_clients == 16], MATCHED)
    with pytest.raises(ValueError, match="two seeds"):
        matched_step_ratios(REFERENCE, MATCHED[MATCHED.seed == 0])


def test_one_over_k_prediction_is_the_line_in_one_over_k_through_the_pilot():
    from validation.matched_step import one_over_k_prediction

    rows = pd.concat([_rows(1, 32.0, 64.0, {0: 3.0, 1: 5.0}), _rows(4, 32.0, 32.0, {0: 2.0, 1: 4.0}),
                      _rows(16, 32.0, 16.0, {0: 1.0, 1: 3.0}), _rows(4, 16.0, 16.0, {0: 9.0, 1: 9.0})])
    t = one_over_k_prediction(rows, columns=("grad_B_end",), n_boot=200)
    assert len(t) == 1 and t.gamma.iloc[0] == 32.0  # the gamma-16 cell has no N = 1 and 16: left out
    m1, m4, m16 = (9 + 25) / 2, (4 + 16) / 2, (1 + 9) / 2  # seed means of the squares
    n = (m1 - m4) / (1 - 1 / 4)  # S + n/K through K = 1 and 4
    assert t.ratio.iloc[0] == pytest.approx(math.sqrt((m4 - n / 4 + n / 16) / m16))
    assert t.measured_rms.iloc[0] == pytest.approx(math.sqrt(m16))
    with pytest.raises(ValueError, match="no .* group"):
        one_over_k_prediction(rows[rows.n_clients != 1])


def test_a_negative_one_over_k_prediction_has_no_ratio_and_no_ci():
    from validation.matched_step import one_over_k_prediction

    # the line in 1/K through K = 1 (mean square 100) and 4 (1) is negative at K = 16
    rows = pd.concat([_rows(1, 32.0, 64.0, {0: 10.0, 1: 10.0, 2: 1.0}), _rows(4, 32.0, 32.0, {0: 1.0, 1: 1.0, 2: 1.0}),
                      _rows(16, 32.0, 16.0, {0: 1.0, 1: 1.0, 2: 1.0})])
    t = one_over_k_prediction(rows, columns=("grad_B_end",), n_boot=200)
    assert t[["ratio", "ci_low", "ci_high"]].isna().all(axis=None) and not t.inside.iloc[0]
