"""The learning-rate sweep: the quick synthetic grid through the experiment runner, and its tables."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from paper_figures import experiments, lr_transfer
from sfed_theory.derivation import lr_transfer_factor, solve_step_size
from sfed_theory.rules import scaling_factor


def test_predicted_transfer_follows_the_derived_step_size():
    # FFA/Adam: lr* ~ 1 / (gamma sqrt(r c_N)); SFed flat at rho = 0, rsLoRA ~ sqrt(N), LoRA ~ sqrt(N r)
    ref = (16, 1)
    assert lr_transfer_factor("sfed", 16.0, ref, (256, 16)) == pytest.approx(1.0)
    assert lr_transfer_factor("rslora", 16.0, ref, (256, 16)) == pytest.approx(4.0)
    assert lr_transfer_factor("lora", 16.0, ref, (256, 16)) == pytest.approx(16.0)
    # correlated clients: SFed's optimum moves down by 1/sqrt(1 + (N - 1) rho)
    assert lr_transfer_factor("sfed", 16.0, ref, (16, 16), rho=0.1) == pytest.approx(1 / math.sqrt(2.5))
    # FedIT's first-order step size is FFA's (its A increment enters at second order in lr)
    assert solve_step_size("fedit") == solve_step_size("ffa")
    assert scaling_factor("sfed", 16.0, 256, 16) == 4.0


def test_refined_transfer_adds_the_coherent_share_over_the_rank():
    ref = (16, 1)
    for cell in [(256, 1), (64, 4), (16, 16)]:  # f_in = 0 is the canonical model
        assert lr_transfer_factor("rslora", 16.0, ref, cell, regime="adam-refined") == pytest.approx(
            lr_transfer_factor("rslora", 16.0, ref, cell))
    # f_in = 1, phi = 0, one client: E||y||^2 ~ gamma^2 s_B^2 r (r + 2), so lr* ~ 1 / (gamma sqrt(r (r + 2)))
    got = lr_transfer_factor("rslora", 16.0, ref, (256, 1), regime="adam-refined", f_in=1.0)
    assert got == pytest.approx(4.0 * math.sqrt(16 * 18 / (256 * 258)))
    # a gradient-aligned share (phi = 1) does not average down with N: SFed's optimum falls by 1/sqrt(N)
    got = lr_transfer_factor("sfed", 16.0, ref, (16, 16), regime="adam-refined", f_in=1.0, phi=1.0)
    assert got == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="f_in"):
        lr_transfer_factor("sfed", 16.0, ref, (16, 4), regime="adam-refined", f_in=1.5)
    with pytest.raises(ValueError, match="regime"):
        lr_transfer_factor("sfed", 16.0, ref, (16, 4), regime="sgd")


def test_rank_exponent_and_prediction_errors_by_hand():
    rows = []
    for rule, gamma in (("lora", lambda r: 16 / r), ("sfed", lambda r: 16 / math.sqrt(r))):
        for n in (1, 4):
            for r in (16, 256):
                fit = 0.01 * r ** -0.7 / gamma(r)  # gamma lr* = 0.01 r^-0.7
                rows.append({"rule": rule, "n_clients": n, "rank": r, "gamma": gamma(r), "lr_star_fit": fit,
                             "edge": False, "steps_off": 0.0 if (n, r) == (1, 16) else {16: 0.5, 256: -2.0}[r],
                             "steps_off_refined": 0.0 if (n, r) == (1, 16) else {16: -0.25, 256: 1.5}[r]})
    opt = pd.DataFrame(rows)
    opt["steps_off_coherent"] = 0.0
    beta = lr_transfer.rank_exponents(opt)
    prod = lr_transfer.product_table(opt).set_index(["n_clients", "rank"])
    assert np.allclose(prod.loc[(4, 256), ["lora", "sfed"]], 0.01 * 256 ** -0.7)
    assert np.allclose(prod.spread_steps, 0.0)  # the same product under both rules
    assert np.allclose(beta.beta, 0.7) and len(beta) == 4
    err = lr_transfer.prediction_errors(opt).set_index(["model", "cells"])
    canon = err.loc[("canonical", "across N (r = 16)")]
    assert canon.n == 2 and canon.mean_steps_off == pytest.approx(0.5) and canon.within_1_step == 2
    other = err.loc[("canonical", "other ranks")]
    assert other.n == 4 and other.max_steps_off == pytest.approx(2.0) and other.within_1_step == 0
    refined = err.loc[("refined, f_in from the gradient check (prediction)", "other ranks")]
    assert refined.mean_steps_off == pytest.approx(1.5) and refined.within_1_step == 0


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory) -> pd.DataFrame:
    """A slice of the quick grid (synthetic task): N in {1, 4}, r = 4, one seed, every learning rate."""
    from validation.grid import load_results, run_grid

    s = experiments.spec("lr_transfer", "quick")
    s = dataclasses.replace(s, grid=dataclasses.replace(s.grid, ranks=(4,), seeds=(0,)))
    work = tmp_path_factory.mktemp("lr")
    cells = s.runs(work)
    assert {c.lr for c in cells} == set(s.lrs) and {c.n_clients for c in cells} == {1, 4}
    assert not [c for c in cells if c.n_clients == 1 and c.rule == "sfed"]  # deduped: rsLoRA's run
    res = run_grid(cells, work, progress=False)
    assert not res.failed
    return load_results(work)


def test_tables_from_the_sweep(quick_sweep):
    curves = lr_transfer.lr_curves(quick_sweep)
    assert set(curves.rule) == {"lora", "rslora", "sfed"}  # sfed at N = 1 copied from rsLoRA
    opt = lr_transfer.optimum_table(quick_sweep, reference=(1, 4))
    assert len(opt) == 6
    lrs = sorted(quick_sweep.lr.unique())
    assert opt.lr_star.isin(lrs).all()
    # the fitted optimum stays within the grid step around the grid optimum
    assert (np.abs(np.log2(opt.lr_star_fit / opt.lr_star)) <= 1.0 + 1e-9).all()
    ref = opt[(opt.n_clients == 1) & (opt["rank"] == 4)].set_index("rule")
    assert (ref.steps_off.abs() < 1e-9).all()  # the prediction is anchored at the reference cell
    tr = lr_transfer.transfer_table(quick_sweep, reference=(1, 4))
    assert (tr.regret >= -1e-12).all()  # the own best lr is never worse than the transferred one
    assert (tr.loc[tr.n_clients == 1, "regret"].abs() < 1e-12).all()
    drift = lr_transfer.drift_table(opt)
    assert set(drift.rule) == {"lora", "rslora", "sfed"} and (drift.drift_all >= 0).all()
    text = lr_transfer.report(quick_sweep, reference=(1, 4))
    assert "transfer regret" in text and "drift" in text


def test_figure_from_the_sweep(quick_sweep, tmp_path):
    paths = lr_transfer.fig_lr_transfer(quick_sweep, tmp_path, formats=("png",), reference=(1, 4))
    assert paths and paths[0].stat().st_size > 10_000


def test_committed_sweep_has_interior_optima_and_a_well_trained_best(capsys):
    df = experiments.load("lr_transfer")
    assert set(df.run_id) == {c.run_id for c in experiments.spec("lr_transfer").runs()}
    opt = lr_transfer.optimum_table(df)
    assert len(opt) == 18 and not opt.edge.any()  # every curve has its optimum inside the window
    assert opt[opt.n_clients == 16].best_acc.max() >= 0.85
    assert lr_transfer.main([]) == 0
    out = capsys.readouterr().out
    assert "transfer regret" in out and "gamma x lr*" in out


def test_the_input_bulk_enters_the_refined_transfer_only_through_the_coherent_share():
    """At f_in = 0 the bulk's part of the output, nu E||dW||_F^2, scales with r and N like ||dW x||^2, so the
    transfer is the canonical one; with a coherent share it dilutes the share's r^2 growth."""
    ref, cell = (16, 1), (256, 16)
    canon = lr_transfer_factor("sfed", 16.0, ref, cell)
    assert lr_transfer_factor("sfed", 16.0, ref, cell, regime="adam-refined", nu=0.3, k=64) == pytest.approx(canon)
    coherent = lr_transfer_factor("sfed", 16.0, ref, cell, regime="adam-refined", f_in=0.2)
    diluted = lr_transfer_factor("sfed", 16.0, ref, cell, regime="adam-refined", f_in=0.2, nu=0.02, k=384)
    assert coherent < diluted < canon  # the bulk pulls the transfer back towards the canonical one
    with pytest.raises(ValueError, match="input size k"):
        lr_transfer_factor("sfed", 16.0, ref, cell, regime="adam-refined", nu=0.02)
