"""The harness's adaptive rule "sfed-adaptive" (issue 6): validation, gamma tracking, no jump at a
gamma change, N = 1, the new columns, resume. Tiny synthetic configs only (fast)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

import sfed_theory
from sfed_theory.rules import effective_clients
from test_harness_helpers import synth
from validation import federated
from validation.adaptive import AdaptiveScaler, rho_standard_error
from validation.aggregation import client_deltas, eval_adapter, init_state
from validation.backends import make_backend
from validation.config import ADAPTIVE_RULE, HARNESS_RULES, RunConfig
from validation.federated import ADAPTIVE_COLUMNS, apply_gamma_change, run
from validation.grid import load_results, run_grid
from validation.metrics import ALL
from validation.models import build_task


def adaptive_cfg(**kw) -> RunConfig:
    base = dict(rule=ADAPTIVE_RULE, n_clients=4, rank=4, rounds=3, local_steps=2, dtype="float64",
                synth_examples=256, synth_dim=16, eval_size=32, probe_size=16)
    base.update(kw)
    return synth(**base)


def all_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.layer == ALL].sort_values("round").reset_index(drop=True)


# ------------------------------------------------------------------------------------------ rules
def test_rule_lives_in_the_harness_not_in_the_theory():
    assert ADAPTIVE_RULE in HARNESS_RULES and ADAPTIVE_RULE not in sfed_theory.RULES
    with pytest.raises(ValueError, match="unknown rule"):
        sfed_theory.scaling_factor(ADAPTIVE_RULE, 16.0, 8, 4)
    with pytest.raises(ValueError, match="sfed-adaptive"):  # the error lists the harness rules
        RunConfig(rule="sfed-adaptve")
    with pytest.raises(ValueError, match="rho"):
        RunConfig(rule="sfed", rho=0.2)
    with pytest.raises(ValueError, match="adaptive_ema"):
        RunConfig(rule=ADAPTIVE_RULE, adaptive_ema=0.0)
    RunConfig(rule=ADAPTIVE_RULE, rho=0.3)  # rho is the adaptive rule's prior


def test_run_ids_of_stored_results_unchanged():
    """Adding the adaptive_ema field must not change existing run ids (resume, stored results)."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "results" / "scaling.parquet"
    if not path.is_file():
        pytest.skip("no stored results")
    df = pd.read_parquet(path).drop_duplicates("run_id").head(5)
    names = {f.name for f in dataclasses.fields(RunConfig)}
    for _, r in df.iterrows():
        d = {k: r[k] for k in names if k in r.index}
        d["target_modules"] = tuple(d["target_modules"].split(",")) if d["target_modules"] else None
        d["participating"] = None if d["participating"] == d["n_clients"] else int(d["participating"])
        d["max_examples"] = None if d["max_examples"] is None or pd.isna(d["max_examples"]) else int(d["max_examples"])
        for k in ("n_clients", "rank", "local_steps", "batch_size", "rounds", "seed", "max_length", "eval_size",
                  "probe_size", "synth_examples", "synth_dim", "synth_classes", "synth_teacher_rank"):
            d[k] = int(d[k])
        for k in ("batched", "weighted"):
            d[k] = bool(d[k])
        assert RunConfig.from_dict(d).run_id == r.run_id


# -------------------------------------------------------------------- gamma tracks alpha*sqrt(N_eff/r)
@pytest.mark.parametrize("rho", [0.0, 0.3, 0.8])
def test_scaler_gamma_converges_to_target_on_known_correlation(rho):
    n, p, alpha, r = 8, 4000, 16.0, 16
    rng = np.random.default_rng(int(rho * 10))
    sc = AdaptiveScaler(alpha, r, prior_rho=0.0, ema=0.3, tau=float("inf"))
    gammas = []
    for _ in range(40):
        z = rng.standard_normal(p)
        x = math.sqrt(rho) * z + math.sqrt(1 - rho) * rng.standard_normal((n, p))
        gammas.append(sc.update(x))
    target = alpha * math.sqrt(effective_clients(n, rho=rho) / r)
    # the EMA of 40 draws has sd ~ se * sqrt(ema / (2 - ema)); allow 5 of those (+ O(1/P) bias)
    tol_rho = 5 * rho_standard_error(rho, n, p) * math.sqrt(0.3 / 1.7) + 1.0 / p + 1e-3
    dg = abs(alpha * math.sqrt(effective_clients(n, rho=min(1, rho + tol_rho)) / r) - target)
    assert abs(np.mean(gammas[-5:]) - target) <= dg + 1e-9, (gammas[-5:], target)
    if rho > 0:  # it started from the prior (SFed's gamma), far from the target: it really moved
        assert abs(gammas[0] - target) > 3 * dg


def test_harness_identical_clients_drive_gamma_to_rslora(monkeypatch):
    """All clients see the same batches -> identical increments -> rho_hat = 1 each round; the
    smoothed rho follows 1 - (1 - ema)^t exactly and gamma approaches rsLoRA's alpha/sqrt(r)."""
    real = federated.client_batches

    def same(cfg, task, parts, clients, rnd, device):
        out = real(cfg, task, parts, clients, rnd, device)
        return [[step[0]] * len(step) for step in out]

    monkeypatch.setattr(federated, "client_batches", same)
    cfg = adaptive_cfg(rounds=4, adaptive_ema=0.5, partition="iid")
    a = all_rows(run(cfg))
    np.testing.assert_allclose(a.rho_est_raw, 1.0, atol=1e-9)
    t = np.arange(1, 5)
    np.testing.assert_allclose(a.rho_est_smoothed, 1 - 0.5 ** t, atol=1e-9)
    expect = [cfg.alpha * math.sqrt(effective_clients(4, rho=1 - 0.5 ** k) / cfg.rank) for k in t]
    np.testing.assert_allclose(a.gamma_next, expect, rtol=1e-12)
    np.testing.assert_allclose(a.gamma[1:], a.gamma_next[:-1], rtol=0)  # next round uses it
    assert a.gamma.iloc[0] == pytest.approx(cfg.alpha * math.sqrt(4 / cfg.rank))  # prior 0: SFed
    rs = cfg.alpha / math.sqrt(cfg.rank)
    assert abs(a.gamma_next.iloc[-1] - rs) < abs(a.gamma.iloc[0] - rs) / 5


# -------------------------------------------------------------------------------------- no jump
@pytest.mark.parametrize("scheme", ["ffa", "fedit", "fedsa", "exact"])
def test_model_output_identical_across_gamma_change(scheme):
    cfg = adaptive_cfg(scheme=scheme)
    task = build_task(cfg)
    dev, dt = torch.device("cpu"), torch.float64
    be = make_backend(True, task.model, task.targets, cfg.rank, 3.0, dev, cfg.n_clients)
    st = init_state(be.shapes, cfg.rank, cfg.n_clients, scheme, 0, torch.full((4,), 0.25, dtype=dt), dt, dev)
    g = torch.Generator().manual_seed(0)
    for n in st.B:  # a trained-looking state: non-zero B (global, or local for FedSA), non-zero merged
        st.B[n] = 0.1 * torch.randn(st.B[n].shape, generator=g, dtype=dt)
        st.merged[n] = 0.01 * torch.randn(st.merged[n].shape, generator=g, dtype=dt)
        if st.B_local is not None:
            st.B_local[n] = 0.1 * torch.randn(st.B_local[n].shape, generator=g, dtype=dt)
    x = {k: v[:16] for k, v in task.eval_inputs.items()}
    y = task.eval_labels[:16]

    def logits():
        be.set_base_delta(st2.merged)
        A, B = eval_adapter(st2)
        be._set_global(A, B)
        with torch.no_grad():
            return be._forward(x).clone()

    st2 = st
    before = logits()
    local_before = client_deltas(st, [0, 2], 3.0) if scheme == "fedsa" else None
    st2 = apply_gamma_change(st, be, 3.0, 1.7)
    assert be.gamma == 1.7
    after = logits()
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    if local_before is not None:  # each client's own model is preserved too
        local_after = client_deltas(st2, [0, 2], 1.7)
        for n in local_before:
            torch.testing.assert_close(local_after[n], local_before[n], rtol=1e-12, atol=1e-14)
    if scheme != "exact":  # negative control: changing gamma without the rescale does move the output
        st2 = st
        be.set_gamma(1.7)
        assert not torch.allclose(logits(), before, rtol=1e-6, atol=1e-8)
    be.probe(*eval_adapter(st2), x, y)  # the backend still works after the change


@pytest.mark.parametrize("scheme", ["ffa", "fedsa"])
def test_in_run_probe_loss_continuous_across_rounds(scheme):
    """probe_loss_start of round t+1 (new gamma, rescaled B) equals probe_loss_end of round t."""
    a = all_rows(run(adaptive_cfg(scheme=scheme, rounds=4)))
    assert (a.gamma_next != a.gamma).any()  # gamma really changed between rounds
    np.testing.assert_allclose(a.probe_loss_start.iloc[1:].to_numpy(), a.probe_loss_end.iloc[:-1].to_numpy(),
                               rtol=1e-10)


# ------------------------------------------------------------------------------------- N = 1, columns
def test_n1_adaptive_run_keeps_rslora_gamma():
    a = all_rows(run(adaptive_cfg(n_clients=1, rounds=3)))
    assert not a.diverged.any()
    rs = sfed_theory.scaling_factor("rslora", 16.0, 4)
    np.testing.assert_allclose(a.gamma, rs, rtol=1e-12)
    np.testing.assert_allclose(a.gamma_next, rs, rtol=1e-12)
    assert a.rho_est_raw.isna().all() and (a.n_eff_est == 1.0).all()


def test_new_columns_present_and_nan_for_fixed_rules():
    ad = run(adaptive_cfg(rounds=2))
    fx = run(adaptive_cfg(rule="sfed", rounds=2))
    for c in ADAPTIVE_COLUMNS:
        assert c in ad and c in fx
        assert ad[c].notna().any(), c
        assert fx[c].isna().all(), c
    assert (all_rows(ad).n_eff_smoothed <= 4 + 1e-9).all() and (all_rows(ad).n_eff_smoothed >= 1).all()
    assert set(fx.columns) == set(ad.columns)


# ------------------------------------------------------------------------------------------- resume
def test_grid_with_adaptive_rule_resumes(tmp_path):
    cfgs = [adaptive_cfg(rounds=2), adaptive_cfg(rounds=2, seed=1)]
    r1 = run_grid(cfgs, tmp_path, progress=False)
    assert sorted(r1.written) == sorted(c.run_id for c in cfgs) and not r1.failed
    first = load_results(tmp_path)
    r2 = run_grid(cfgs, tmp_path, progress=False)
    assert not r2.written and sorted(r2.skipped) == sorted(r1.written)
    again = load_results(tmp_path)
    pd.testing.assert_frame_equal(first, again)
    assert first.gamma_next.notna().all()


# ------------------------------------------------------------------- analysis and issue-6 figures
@pytest.fixture(scope="module")
def small_grid() -> pd.DataFrame:
    frames = []
    for n in (1, 2, 4):
        for r in (4, 8):
            for rule in ("rslora", "sfed", ADAPTIVE_RULE):
                if n == 1 and rule != "rslora":
                    continue  # deduped like the issue-6 grids: the tables copy rsLoRA's N = 1 rows
                frames.append(run(adaptive_cfg(rule=rule, n_clients=n, rank=r, rounds=2)))
    return pd.concat(frames, ignore_index=True)


def test_fit_exponents_predicts_the_adaptive_rule(small_grid):
    from paper_figures.convergence_figs import normcheck_fits
    from validation.analysis import fit_exponents

    f = fit_exponents(small_grid[small_grid.n_clients > 1], round=2, n_boot=50, rho_column="rho_ratio")
    ad = f[f.rule == ADAPTIVE_RULE]
    sf = f[f.rule == "sfed"]
    assert len(ad) and ad.predicted_rho_hat.notna().all() and ad.predicted_rho0.notna().all()
    # at rho = 0 the adaptive rule is predicted exactly as SFed (its prior)
    m = ad.merge(sf, on=["quantity", "wrt", "fixed"], suffixes=("", "_s"))
    np.testing.assert_allclose(m.predicted_rho0, m.predicted_rho0_s, rtol=1e-9, atol=1e-9)
    nf = normcheck_fits(small_grid, n_boot=50)
    assert set(nf.rule) == {"rslora", "sfed", ADAPTIVE_RULE} and (nf.quantity == "update_fro").all()
    assert {"n_clients", "rank"} == set(nf.wrt)


def test_convergence_table_and_figure(small_grid, tmp_path):
    from paper_figures.convergence_figs import convergence_table, fig_convergence

    t = convergence_table(small_grid, frac=0.99)
    assert len(t) == 3 * 2 * 3  # every rule at every (N, r), N = 1 filled from rsLoRA
    n1 = t[(t.n_clients == 1)]
    assert n1[n1.rule != "rslora"].from_rslora.all() and not n1[n1.rule == "rslora"].from_rslora.any()
    assert ((t.best_acc >= t.final_acc - 1e-12) & (t.best_loss <= t.final_loss + 1e-12)).all()
    assert (t.divergences == 0).all()
    paths = fig_convergence(small_grid, tmp_path, formats=("png",))
    assert paths and all(p.stat().st_size > 10_000 for p in paths)


def test_eval_subset_is_spread_over_a_label_sorted_eval_split():
    """The eval split keeps the data set's order (BBC is stored sorted by label); the first 64
    examples were one class. The run's eval subset must be a fixed spread-out draw instead."""
    from validation.federated import eval_indices

    labels = np.repeat(np.arange(5), 89)  # 445 eval examples sorted by label, like BBC's split
    idx = eval_indices(len(labels), 64).numpy()
    assert len(idx) == 64 and len(np.unique(idx)) == 64 and (np.diff(idx) > 0).all()
    assert np.bincount(labels[idx], minlength=5).min() >= 5  # every class is represented
    np.testing.assert_array_equal(idx, eval_indices(len(labels), 64).numpy())  # same subset every run
    np.testing.assert_array_equal(eval_indices(10, 64).numpy(), np.arange(10))  # small split: all of it


def test_run_can_return_final_state_and_gamma():
    from validation.aggregation import total_delta

    cfg = adaptive_cfg(rounds=2)
    df, state, gamma = run(cfg, return_state=True)
    a = all_rows(df)
    assert gamma == a.gamma_next.iloc[-1]  # the adaptive rule's gamma for a next round
    tot = total_delta(state, gamma)
    assert all(float(t.abs().max()) > 0 for t in tot.values())
    timing = ["wall_s", "train_s"]
    pd.testing.assert_frame_equal(df.drop(columns=timing), run(cfg).drop(columns=timing))
