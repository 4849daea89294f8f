"""Refined parameters on disk: read back exactly, and only for the rows they were fitted on."""

from __future__ import annotations

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
