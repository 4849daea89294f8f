"""The per-gamma comparison of rules at a fixed (rank, N), against hand computations on a few rows."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from validation.gamma_response import per_gamma_metrics, rule_ratios
from validation.metrics import ALL


def _rows(**over) -> pd.DataFrame:
    """Two seeds of LoRA (gamma 1) and rsLoRA (gamma 2) in one cell, plus a per-layer row the analysis must skip."""
    base = dict(scheme="ffa", partition="iid", local_steps=2, rank=4, n_clients=1, layer=ALL, round=1)
    rows = [
        dict(base, rule="lora", gamma=1.0, seed=0, loss_change=-1.0, curvature=1.0, inc_B_rms=1.0),
        dict(base, rule="lora", gamma=1.0, seed=1, loss_change=-3.0, curvature=3.0, inc_B_rms=1.0),
        dict(base, rule="rslora", gamma=2.0, seed=0, loss_change=-4.0, curvature=1.0, inc_B_rms=2.0),
        dict(base, rule="rslora", gamma=2.0, seed=1, loss_change=-8.0, curvature=2.0, inc_B_rms=2.0),
        dict(base, rule="rslora", gamma=2.0, seed=1, loss_change=-800.0, curvature=99.0, inc_B_rms=9.0, layer="q"),
    ]
    return pd.DataFrame(rows).assign(**over)


def _ratio(t: pd.DataFrame, metric: str) -> pd.Series:
    return t[t.metric == metric].iloc[0]


def test_ratios_are_ratios_of_seed_means_per_unit_gamma():
    t = rule_ratios(_rows(), n_boot=200)
    # loss change per gamma: LoRA mean (-1 - 3)/2 = -2, rsLoRA mean (-2 - 4)/2 = -3 -> 1.5 (without the division: 3)
    assert _ratio(t, "loss_per_gamma").ratio == pytest.approx(1.5)
    # curvature: (1 + 2)/2 over (1 + 3)/2 = 0.75 (a mean of per-seed ratios would give (1 + 2/3)/2 = 0.833)
    assert _ratio(t, "curvature").ratio == pytest.approx(0.75)
    assert _ratio(t, "inc_B_rms").ratio == pytest.approx(2.0)
    for _, row in t.iterrows():
        assert row.ci_low <= row.ratio <= row.ci_high
        assert row.n_seeds == 2 and row.gamma == 2.0 and row.gamma_reference == 1.0 and row.rule == "rslora"


def test_seeds_are_paired_and_unmeasured_metrics_left_out():
    rows = _rows()
    rows.loc[(rows.rule == "lora") & (rows.seed == 1), "seed"] = 7  # a LoRA seed rsLoRA did not run
    rows["curvature"] = math.nan  # FedSA's runs do not measure it
    t = rule_ratios(rows, n_boot=50)
    assert set(t.metric) == {"loss_per_gamma", "inc_B_rms"}
    row = _ratio(t, "loss_per_gamma")  # seed 0 alone: -2 over -1
    assert row.n_seeds == 1 and row.ratio == pytest.approx(2.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown metrics"):
        rule_ratios(_rows(), metrics=("grad_A",))
    with pytest.raises(ValueError, match="no 'sfed' runs"):
        rule_ratios(_rows(), reference="sfed")
    with pytest.raises(ValueError, match="gamma must be positive"):
        per_gamma_metrics(_rows(gamma=0.0))


def test_stored_table_is_the_stored_runs_ratios():
    """``results/gamma_response.csv`` is what the table script computes from the stored runs (point estimates;
    the CIs depend on the bootstrap's size)."""
    from paper_figures.experiments import DEFAULT_RESULTS
    from paper_figures.gamma_response_table import gamma_response_table

    stored = pd.read_csv(DEFAULT_RESULTS / "gamma_response.csv")
    fresh = gamma_response_table(n_boot=5)
    key = ["check", "scheme", "partition", "local_steps", "rank", "n_clients", "rule", "metric"]
    both = stored.merge(fresh, on=key, suffixes=("_stored", "_fresh"), validate="one_to_one")
    assert len(both) == len(stored) == len(fresh)
    assert (both.ratio_stored - both.ratio_fresh).abs().max() < 1e-9
    # the finding the docs quote: with one local step the increments ignore gamma, with two the curvature falls
    one = stored[(stored.local_steps == 1) & (stored.metric != "curvature")]
    assert (one.ratio - 1).abs().max() < 2e-3
    two = stored[(stored.local_steps == 2) & (stored.metric == "curvature") & (stored["rank"] == 64)]
    assert two.ratio.max() < 0.85
