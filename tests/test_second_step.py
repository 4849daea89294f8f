"""The second local step's measured inputs (validation.second_step) against Adam's own arithmetic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sfed_theory.adam_steps import second_step_ratio
from test_harness_helpers import synth
from validation.second_step import SMALL_GRADIENT, recorded_round, second_step_changes, second_step_summary


def test_one_clients_b_after_two_steps_is_adams_sign_step_plus_f_of_the_recorded_change():
    """N = 1, FFA, B starts at 0: each coordinate of the client's B (the server's, unaveraged) is
    -lr sign(g0) (1 + f(x)) with x = (g1 - g0)/g0 from the recorded gradients (Adam's eps aside), so a recording
    that swapped the steps, dropped a client slot or mis-signed x fails."""
    cfg = synth(n_clients=1, scheme="ffa", optimizer="adamw", lr=1e-2, weight_decay=0.0)
    g0, g1, rows, state = recorded_round(cfg)
    assert len(g0) == len(state.B) and not rows.diverged.any()
    for (name, b), a0, a1 in zip(state.B.items(), g0, g1):
        keep = a0[0].abs() > SMALL_GRADIENT * a0[0].abs().mean()
        x = ((a1[0] - a0[0]) / a0[0])[keep].numpy()
        want = -cfg.lr * np.sign(a0[0][keep].numpy()) * (1.0 + second_step_ratio(x))
        assert b.double()[keep].numpy() == pytest.approx(want, rel=1e-4, abs=1e-7), name
    x_all, _ = second_step_changes(cfg)
    assert x_all.size == sum(int((a[0].abs() > SMALL_GRADIENT * a[0].abs().mean()).sum()) for a in g0)


def test_clients_are_the_trained_slots_and_bad_configs_are_refused():
    g0, g1, _, _ = recorded_round(synth(n_clients=3, scheme="ffa", optimizer="adamw"))
    assert all(a.shape[0] == 3 and a.dtype == torch.float64 for a in g0 + g1)
    for bad in (dict(optimizer="sgd"), dict(scheme="fedit"), dict(local_steps=1)):
        with pytest.raises(ValueError, match="AdamW under FFA"):
            second_step_changes(synth(**{"scheme": "ffa", "optimizer": "adamw", **bad}))


def test_summary_by_hand():
    x = np.array([0.0, -0.5, -1.0, -2.0])
    s = second_step_summary(x)
    assert s["n_coordinates"] == 4 and s["x_median"] == pytest.approx(-0.75)
    assert s["share_below_half"] == pytest.approx(0.5) and s["share_below_one"] == pytest.approx(0.25)
    assert s["f_mean"] == pytest.approx(np.mean(second_step_ratio(x)))
    h = 1e-6
    assert s["f_slope_mean"] == pytest.approx(np.mean((second_step_ratio(x + h) - second_step_ratio(x - h)) / (2 * h)),
                                              rel=1e-5)
    with pytest.raises(ValueError, match="no coordinates"):
        second_step_summary(np.array([]))


def test_the_table_has_one_row_per_config_and_the_cells_keep_the_gradient_checks_settings(tmp_path):
    import json

    from paper_figures.second_step_table import CELLS, GRID, cell_config, second_step_table, write_table

    table = second_step_table([synth(n_clients=n, rule=rule, scheme="ffa", optimizer="adamw", seed=0)
                               for rule, n in (("lora", 1), ("sfed", 2))])
    assert list(table.rule) == ["lora", "sfed"] and list(table.n_clients) == [1, 2]
    assert (table.n_coordinates > 0).all() and table.f_mean.between(-1, 1.1).all()
    path = write_table(table, tmp_path, [0])
    assert np.allclose(pd.read_csv(path).f_mean, table.f_mean)
    entry = json.loads((tmp_path / "manifest.json").read_text())["second_step_x"]
    assert entry["file"] == path.name and entry["seeds"] == [0] and "harness" in entry
    base = json.loads(GRID.read_text())["base"]
    for rule, n in CELLS:
        cfg = cell_config(rule, n, seed=3)
        assert (cfg.scheme, cfg.partition, cfg.rank, cfg.seed, cfg.optimizer) == ("ffa", "iid", 64, 3, "adamw")
        assert (cfg.lr, cfg.local_steps, cfg.batch_size, cfg.model) == (base["lr"], base["local_steps"],
                                                                        base["batch_size"], base["model"])
