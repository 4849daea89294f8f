"""The correlation-vs-K table and the two K-laws, against hand computations."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from validation.correlation_law import correlation_by_k, k_law_predictions


def _rows(k: int, values: list[float], **extra) -> list[dict]:
    return [{"scheme": "ffa", "partition": "iid", "layer": "__all__", "round": 1, "n_participating": k,
             "diverged": False, "rho_ratio": v, "rho_gA": 2 * v, **extra} for v in values]


def test_table_takes_the_mean_and_standard_error_of_the_all_rows_at_each_k():
    df = pd.DataFrame(_rows(2, [0.0, 0.2]) + _rows(4, [0.1, 0.1, 0.4])
                      + _rows(4, [9.0], layer="q")  # a single layer: not the concatenation
                      + _rows(4, [9.0], diverged=True) + _rows(1, [9.0]) + _rows(4, [9.0], round=2))
    t = correlation_by_k(df).set_index(["column", "K"])
    assert t.loc[("rho_ratio", 2), "mean"] == pytest.approx(0.1)
    assert t.loc[("rho_ratio", 2), "se"] == pytest.approx(math.sqrt(0.02) / math.sqrt(2))  # sd 0.1414
    assert t.loc[("rho_ratio", 4), "mean"] == pytest.approx(0.2) and t.loc[("rho_ratio", 4), "n"] == 3
    assert t.loc[("rho_ratio", 4), "se"] == pytest.approx(math.sqrt(0.03) / math.sqrt(3))
    assert t.loc[("rho_gA", 4), "mean"] == pytest.approx(0.4)
    assert "rho_out" not in t.index.get_level_values("column")  # a column the rows lack is left out


def test_both_laws_pass_through_the_pilot_and_differ_beyond_it():
    table = pd.DataFrame({"scheme": "ffa", "partition": "iid", "column": "rho_gA", "K": [2, 4], "mean": [0.0, 0.1],
                          "se": 0.01, "n": 9})
    p = k_law_predictions(table, (2, 4), [2, 4, 16]).set_index(["law", "K"])
    # 1/(K-1): s = 0.1 / (1 - 1/3) = 0.15, rho_inf = 0.15, rho_16 = 0.15 - 0.01
    assert p.loc[("1/(K-1)", 2), "predicted"] == pytest.approx(0.0)
    assert p.loc[("1/(K-1)", 4), "predicted"] == pytest.approx(0.1)
    assert p.loc[("1/(K-1)", 16), "predicted"] == pytest.approx(0.14)
    assert p.loc[("1/(K-1)", 16), "s"] == pytest.approx(0.15)
    # 1/K: s = 0.1 / (1/2 - 1/4) = 0.4, rho_inf = 0.2, rho_16 = 0.2 - 0.025
    assert p.loc[("1/K", 16), "predicted"] == pytest.approx(0.175)
    assert p.loc[("1/K", 2), "predicted"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="two different"):
        k_law_predictions(table, (4, 4), [16])
