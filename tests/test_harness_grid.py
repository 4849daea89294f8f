"""Grid runner (atomic files, resume, divergence), analysis and CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import sfed_theory
import validation.grid as grid_mod
from test_harness_helpers import synth
from validation.analysis import fit_exponents, format_report
from validation.cli import main
from validation.config import GridConfig
from validation.grid import is_complete, load_results, result_path, run_grid, write_run
from validation.plots import coordinate_check


def _grid(**kw) -> GridConfig:
    return GridConfig(base=synth(rounds=1, local_steps=1, **kw), n_clients=(1, 2), ranks=(2,), rules=("lora",))


def test_resume_skips_finished_and_ignores_half_written(tmp_path, monkeypatch):
    g = _grid()
    cfgs = g.runs()
    res = run_grid(g, tmp_path, progress=False)
    assert sorted(res.written) == sorted(c.run_id for c in cfgs) and not res.failed
    df = load_results(tmp_path)
    assert df["run_id"].nunique() == 2
    assert (df["version"] == sfed_theory.__version__).all()
    assert {"rank", "rule", "n_clients", "scheme", "optimizer", "seed", "layer", "round"} <= set(df.columns)

    # a half-written result for a third cell and a stray temporary file
    g3 = GridConfig(base=g.base, n_clients=(1, 2, 3), ranks=(2,), rules=("lora",))
    third = [c for c in g3.runs() if c.n_clients == 3][0]
    good = result_path(tmp_path, cfgs[0]).read_bytes()
    result_path(tmp_path, third).write_bytes(good[: len(good) // 2])
    (tmp_path / f".{third.run_id}.parquet.tmp-123").write_bytes(good)
    assert not is_complete(result_path(tmp_path, third))
    with pytest.warns(UserWarning, match="incomplete"):
        assert load_results(tmp_path)["run_id"].nunique() == 2

    calls = []
    real_run = grid_mod.run
    monkeypatch.setattr(grid_mod, "run", lambda c: calls.append(c.run_id) or real_run(c))
    res = run_grid(g3, tmp_path, progress=False)
    assert calls == [third.run_id]
    assert len(res.skipped) == 2 and res.written == [third.run_id]
    assert load_results(tmp_path)["run_id"].nunique() == 3


def test_runs_that_predate_a_field_load_with_its_default(tmp_path):
    # a run written before probe_from existed has no such column; next to a newer run it would be NaN
    write_run(pd.DataFrame({"run_id": ["old"], "grad_B": [1.0]}), tmp_path / "old.parquet")
    write_run(pd.DataFrame({"run_id": ["new"], "grad_B": [2.0], "probe_from": ["heldout"], "adaptive_ema": [0.9]}),
              tmp_path / "new.parquet")
    df = load_results(tmp_path).set_index("run_id")
    assert df.loc["old", "probe_from"] == "train" and df.loc["new", "probe_from"] == "heldout"
    assert df.loc["old", "adaptive_ema"] == 0.5 and df.loc["new", "adaptive_ema"] == 0.9
    write_run(pd.DataFrame({"run_id": ["a"]}), tmp_path / "solo" / "a.parquet")
    assert load_results(tmp_path / "solo").probe_from.tolist() == ["train"]


def test_divergence_is_flagged_and_grid_continues(tmp_path):
    bad = synth(optimizer="sgd", lr=1e30, rounds=3, dtype="float32")  # the update overflows float32
    good = synth(rounds=1)
    missing = synth(n_clients=500, max_examples=50)  # N > data: a clear failure, not a crash
    with pytest.warns(UserWarning, match="failed"):
        res = run_grid([bad, missing, good], tmp_path, progress=False)
    assert set(res.written) == {bad.run_id, good.run_id}
    assert "exceeds the" in res.failed[missing.run_id]
    df = load_results(tmp_path)
    d = df[df.run_id == bad.run_id]
    assert d["diverged"].all() and (d["diverged_round"] >= 1).all()
    assert "non-finite" in d["error"].iloc[0]
    assert not df.loc[df.run_id == good.run_id, "diverged"].any()


@pytest.mark.parametrize("batched", [True, False])
def test_non_finite_loss_mid_run_is_flagged(batched):
    import math

    from validation.federated import run
    from validation.models import build_task

    cfg = synth(rounds=2, batched=batched)
    task = build_task(cfg)
    task.train_inputs["x"][task.train_labels == 0] = math.nan  # poisoned examples reach some client's batch
    df = run(cfg, task)
    assert df["diverged"].all()
    assert "non-finite loss" in df["error"].iloc[0]
    assert set(df.columns) >= {"update_fro", "train_loss", "rho_hat"}


def _fake_results(slope_r: float, slope_n: float) -> pd.DataFrame:
    """Rows with a known power law v = r^slope_r * N^slope_n * noise, 3 seeds x 4 layers."""
    rng = np.random.default_rng(0)
    rows = []
    for rule in ("lora", "sfed"):
        for n in (1, 4, 16):
            for r in (4, 16, 64):
                for seed in range(3):
                    for layer in ("l0", "l1", "l2", "l3"):
                        v = r ** slope_r * n ** slope_n * np.exp(rng.normal(0, 0.05))
                        rows.append(dict(rule=rule, n_clients=n, participating=n, n_participating=n, rank=r,
                                         seed=seed, layer=layer, round=1, scheme="ffa", optimizer="adamw",
                                         alpha=16.0, diverged=False, d_out=384, k_in=384, rho_hat=0.0,
                                         adapter_rms=v, update_fro=v, grad_A_end=v, grad_B_end=v))
    df = pd.DataFrame(rows)
    agg = df.groupby([c for c in df.columns if c not in ("layer", "adapter_rms", "update_fro", "grad_A_end",
                                                          "grad_B_end")], as_index=False)[
        ["adapter_rms", "update_fro", "grad_A_end", "grad_B_end"]].apply(lambda x: np.sqrt((x ** 2).sum()))
    agg["layer"] = "__all__"
    return pd.concat([df, agg], ignore_index=True)


def test_fit_exponents_recovers_known_slopes_and_reports_predictions(tmp_path):
    fits = fit_exponents(_fake_results(-0.5, 0.25), n_boot=200)
    r_fits = fits[fits.wrt == "rank"]
    n_fits = fits[fits.wrt == "n_clients"]
    assert np.allclose(r_fits["measured"], -0.5, atol=0.03)
    assert np.allclose(n_fits["measured"], 0.25, atol=0.03)
    assert ((fits["ci_low"] <= fits["measured"]) & (fits["measured"] <= fits["ci_high"])).all()
    assert (fits["ci_high"] - fits["ci_low"] > 0).all()
    assert (fits["p_within_tol"] > 0.9).all()  # 5% noise on 12 values per point: slopes pinned well within 0.05
    # predictions come from sfed_theory.predict: adapter output of LoRA under Adam/FFA falls like r^-1/2
    row = fits[(fits.rule == "lora") & (fits.quantity == "adapter_output") & (fits.wrt == "rank")].iloc[0]
    assert row["predicted_rho0"] == pytest.approx(-0.5, abs=1e-6)
    text = format_report(fits)
    assert "adapter_output" in text and "sfed" in text
    paths = coordinate_check(_fake_results(-0.5, 0.25), tmp_path)
    assert paths and paths[0].stat().st_size > 10_000


def test_p_within_tol_is_the_share_of_bootstrap_slopes_near_the_estimate():
    """Two seeds, one layer, points x = 1, 4: seed 0 is flat, seed 1 grows as x^1. The point estimate is
    the RMS over seeds (sqrt((1 + 16) / 2) at x = 4, not the mean 2.5). A seed resample is (0,0) -> slope
    0, (1,1) -> 1 (1/4 each) or mixed -> the estimate (1/2)."""
    from validation.analysis import _fit_one

    cube = np.array([[[1.0], [1.0]], [[1.0], [4.0]]])  # [point, seed, layer]
    fit = _fit_one(cube, np.array([1.0, 4.0]), 4000, np.random.default_rng(0))
    assert fit.slope == pytest.approx(np.log(np.sqrt(8.5)) / np.log(4))
    assert fit.p_within_tol == pytest.approx(0.5, abs=0.03)
    assert (fit.lo, fit.hi) == (pytest.approx(0.0), pytest.approx(1.0))
    exact = _fit_one(np.array([[[1.0], [1.0]], [[2.0], [2.0]]]), np.array([1.0, 4.0]), 200, np.random.default_rng(0))
    assert exact.slope == pytest.approx(0.5) and exact.p_within_tol == 1.0
    # layers add in squares within a seed: layers (3, 4) -> norm 5 at x = 4, against 1 at x = 1
    layered = _fit_one(np.array([[[1.0, 0.0]], [[3.0, 4.0]]]), np.array([1.0, 4.0]), 10, np.random.default_rng(0))
    assert layered.slope == pytest.approx(np.log(5) / np.log(4))


def test_bootstrap_slopes_are_the_resampled_cubes_slopes_one_by_one():
    """The bootstrap computes all its resamples at once; each must be :func:`loglog_slope` of that resample's
    RMS norms, drawn from the same random stream as one resample at a time (so stored CIs do not move). Points
    1 and 2 have seed 0 only and point 3 is all zero: a resample without seed 0 has one usable point (NaN).
    A missing run is left out of the RMS over seeds: counted as a zero norm, the one seed of norm 4 below
    would read as 4/sqrt(2)."""
    from validation.analysis import TOLERANCE, _fit_one, _loglog_slopes, loglog_slope

    rng = np.random.default_rng(3)
    cube = np.exp(rng.normal(size=(4, 5, 3))) * np.array([1.0, 2.0, 4.0, 8.0])[:, None, None]
    cube[1:3, 1:, :] = np.nan
    cube[3, :, :] = 0.0
    xs = np.array([1.0, 2.0, 4.0, 16.0])
    reference, draw = [], np.random.default_rng(7)
    for _ in range(300):
        s, l_ = draw.integers(0, 5, 5), draw.integers(0, 3, 3)
        c = cube[:, s][:, :, l_]
        y = [np.sqrt(np.mean([np.nansum(run ** 2) for run in point if not np.isnan(run).all()] or [np.nan]))
             for point in c]  # a seed without any layer is a missing run, left out
        reference.append(loglog_slope(xs, np.array(y)))
    reference = np.asarray(reference)
    fit = _fit_one(cube, xs, 300, np.random.default_rng(7))
    finite = reference[np.isfinite(reference)]
    assert 100 < finite.size < 300  # about (4/5)^5 of the resamples miss seed 0
    assert (fit.lo, fit.hi) == (pytest.approx(np.percentile(finite, 2.5)), pytest.approx(np.percentile(finite, 97.5)))
    assert fit.p_within_tol == pytest.approx(np.mean(np.abs(finite - fit.slope) <= TOLERANCE))
    missing = np.array([[[1.0, 0.0], [0.0, 1.0]], [[4.0, 0.0], [np.nan, np.nan]]])  # point 1: seed 1 missing
    assert _fit_one(missing, np.array([1.0, 4.0]), 20, np.random.default_rng(0)).slope == pytest.approx(1.0)
    ys = np.array([xs ** 0.75, [1.0, np.nan, 0.0, 3.0], [1.0, np.nan, np.nan, np.nan], [2.0, 2.0, -1.0, 5.0]])
    want = [loglog_slope(xs, y) for y in ys]
    assert _loglog_slopes(xs, ys) == pytest.approx(want, nan_ok=True)
    assert np.isnan(_loglog_slopes(xs, ys)[2]) and _loglog_slopes(xs, ys)[0] == pytest.approx(3 / 4)


def test_analyze_takes_the_measured_curvature_by_default():
    from validation.cli import _parser

    assert _parser().parse_args(["analyze", "d"]).curvature == "measured"
    assert _parser().parse_args(["analyze", "d", "--curvature", "one"]).curvature == "one"


def test_cli_run_and_analyze(tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["run", "--model", "synthetic", "--dataset", "synthetic", "--ranks", "2", "4", "--n-clients", "1", "2",
            "--rules", "lora", "sfed", "--seeds", "0", "--rounds", "1", "--out", str(out), "--no-progress", "--n-boot", "50",
            "--set", "synth_examples=128", "synth_dim=8", "local_steps=1", "eval_size=16"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "written 8" in text and "exponent in rank r" in text
    assert (out / "coord_check_ffa_adamw.png").exists() and (out / "exponents.csv").exists()
    assert main(argv) == 0
    assert "skipped (already finished) 8" in capsys.readouterr().out
    assert main(["analyze", str(out), "--n-boot", "50"]) == 0
    stored = pd.read_csv(out / "refined_params.csv")  # the default law: the pilot's measured curvature per rule@rank
    assert stored.curvature_measured.astype(str).str.contains("lora@2").all()
    assert main(["run", "--rules", "nope", "--out", str(out)]) == 2
    assert "unknown rule" in capsys.readouterr().err
