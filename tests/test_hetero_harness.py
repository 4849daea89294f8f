"""The harness with clients of different ranks (issue 13, item 3): config, backends, aggregation, runs.

All on the synthetic task in float64 (seconds)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import sfed_theory
from sfed_theory.hetero_rules import mix_ranks
from test_harness_helpers import synth
from validation.aggregation import aggregate_hetero, client_start_hetero, init_state, total_delta
from validation.backends import BatchedBackend, LoopBackend
from validation.batched_lora import BatchedLoRALinear
from validation.config import GridConfig, RunConfig
from validation.federated import run
from validation.models import build_task

RANKS = (2, 4, 8)
CPU = torch.device("cpu")


def hetero(**kw) -> RunConfig:
    base = dict(n_clients=3, rank=8, client_ranks=RANKS, rounds=2)
    base.update(kw)
    return synth(**base)


# ------------------------------------------------------------------------------------------------ config
def test_config_takes_client_ranks_and_keeps_old_run_ids():
    cfg = RunConfig.from_dict({**synth().to_dict(), "n_clients": 3, "rank": 8, "client_ranks": [2, 4, 8]})
    assert cfg.client_ranks == (2, 4, 8) and cfg.to_dict()["client_ranks"] == [2, 4, 8]
    assert cfg.run_id != dataclasses.replace(cfg, client_ranks=(8, 4, 2)).run_id
    # ids written before client ranks existed (hash without the field at its default)
    assert RunConfig().run_id == "e43cfa47eecb842a"
    assert synth().run_id == "3f4fdad254b52ed1"
    assert synth(scheme="exact", rule="lora", n_clients=5).run_id == "02713b0fe260981d"


@pytest.mark.parametrize("kw,match", [
    (dict(client_ranks=(2, 4)), "one rank per client"),
    (dict(client_ranks=(2, 4, 0)), "integer >= 1"),
    (dict(rank=16), "rank=16 but max"),
    (dict(scheme="fedsa"), "fedsa"),
    (dict(rule="sfed-adaptive"), "not defined for client ranks"),
    (dict(client_ranks=None, rank=4, rule="sfed-hetero"), "set client_ranks"),
    (dict(client_ranks=None, rank=4, scheme="svd"), "set client_ranks"),
    (dict(rule="sfed", rho=0.2), "rho is only used"),
])
def test_config_refuses_what_client_ranks_do_not_support(kw, match):
    with pytest.raises(ValueError, match=match):
        hetero(**kw)


def test_config_allows_rho_for_the_derived_rules_and_every_hetero_scheme():
    for rule in ("sfed-hetero", "sfed-hetero-shared"):
        assert hetero(rule=rule, rho=0.3).rho == 0.3
    for scheme in ("ffa", "fedit", "exact", "svd"):
        assert hetero(scheme=scheme).scheme == scheme


def test_grid_rank_mixes_cycle_the_mix_to_each_n():
    grid = GridConfig.from_dict({"base": {"model": "synthetic", "dataset": "synthetic"}, "n_clients": [2, 5],
                                 "rank_mixes": [[4, 16, 64]], "rules": ["lora", "sfed-hetero"]})
    runs = grid.runs()
    assert [(c.n_clients, c.client_ranks, c.rank, c.rule) for c in runs] == [
        (2, (4, 16), 16, "lora"), (2, (4, 16), 16, "sfed-hetero"),
        (5, mix_ranks((4, 16, 64), 5), 64, "lora"), (5, mix_ranks((4, 16, 64), 5), 64, "sfed-hetero")]
    assert all(c.client_ranks is None for c in GridConfig(base=synth()).runs())


# ---------------------------------------------------------------------------------------------- backends
def _padded_start(task, ranks, width, seed=0):
    """Random adapters of width ``width`` whose block beyond each client's rank is zero."""
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for n in task.targets:
        d, k = task.model.get_submodule(n).weight.shape
        a = torch.randn(len(ranks), width, k, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(len(ranks), d, width, generator=g, dtype=torch.float64) * 0.1
        for i, r in enumerate(ranks):
            a[i, r:] = 0
            b[i, :, r:] = 0
        A[n], B[n] = a, b
    return A, B


def _batches(task, k, steps=3, b=4):
    x, y = task.train_inputs["x"], task.train_labels
    return [[({"x": x[(t * k + i) * b:(t * k + i + 1) * b]}, y[(t * k + i) * b:(t * k + i + 1) * b])
             for i in range(k)] for t in range(steps)]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_padded_block_stays_zero_and_batched_equals_loop_with_client_gammas(optimizer):
    cfg = synth()
    task = build_task(cfg)
    gammas = (3.0, 1.5, 0.7)
    A, B = _padded_start(task, RANKS, 8)
    kw = dict(train_A=True, optimizer=optimizer, lr=1e-2, weight_decay=0.1)
    out = {}
    for name, be in (("batched", BatchedBackend(task.model, task.targets, 8, 1.0, CPU, n_slots=3)),
                     ("loop", LoopBackend(task.model, task.targets, 8, 1.0, CPU))):
        be.set_client_gammas(gammas)
        out[name] = be.train_clients({n: a.clone() for n, a in A.items()}, {n: b.clone() for n, b in B.items()},
                                     _batches(task, 3), **kw)
        A1, B1 = out[name][:2]
        for n in task.targets:
            assert not torch.equal(B1[n], B[n])  # training moved the adapters
            for i, r in enumerate(RANKS):
                assert torch.count_nonzero(A1[n][i, r:]) == 0 and torch.count_nonzero(B1[n][i, :, r:]) == 0
    for a, b in zip(out["batched"], out["loop"]):
        if isinstance(a, dict):
            for n in a:
                torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-12)
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_client_gammas_scale_each_clients_output_and_probes_use_the_server_gamma():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3).double()
    layer = BatchedLoRALinear(lin, n_slots=2, rank=2, gamma=2.0)
    with torch.no_grad():
        layer.A.normal_()
        layer.B.normal_()
    x = torch.randn(4, 5, dtype=torch.float64)  # 2 clients x 2 rows
    base = layer(x)
    layer.slot_gammas = torch.tensor([2.0, 0.5], dtype=torch.float64)
    mixed = layer(x)
    torch.testing.assert_close(mixed[:2], base[:2])
    torch.testing.assert_close(mixed[2:] - lin(x[2:]), 0.25 * (base[2:] - lin(x[2:])))
    task = build_task(synth())
    be = BatchedBackend(task.model, task.targets, 4, 2.0, CPU, n_slots=3)
    be.set_client_gammas((1.0, 2.0))
    with pytest.raises(ValueError, match="2 client gammas set for 3 clients"):
        be.train_clients(*_padded_start(task, (4, 4, 4), 4), _batches(task, 3), train_A=False, optimizer="sgd",
                         lr=0.1, weight_decay=0.0)


# ------------------------------------------------------------------------------------------- aggregation
def _state(scheme, width=8, shapes=None, seed=0):
    shapes = shapes or {"l": (6, 7)}
    p = torch.full((3,), 1 / 3, dtype=torch.float64)
    return init_state(shapes, width, 3, scheme, seed, p, torch.float64, CPU)


def _trained(A0, B0, seed=1, ranks=RANKS, train_a=True):
    g = torch.Generator().manual_seed(seed)
    A1, B1 = {}, {}
    for n in A0:
        A1[n] = A0[n] + (0.1 * torch.randn(A0[n].shape, generator=g, dtype=torch.float64) if train_a else 0)
        B1[n] = B0[n] + 0.1 * torch.randn(B0[n].shape, generator=g, dtype=torch.float64)
        for i, r in enumerate(ranks):
            A1[n][i, r:] = 0
            B1[n][i, :, r:] = 0
    return A1, B1


@pytest.mark.parametrize("scheme", ["ffa", "fedit", "exact", "svd"])
def test_server_aggregate_is_the_weighted_sum_of_the_clients_own_models(scheme):
    """Every scheme enters client i's trained adapter as ``p_i g_i B_i A_i``: the round-1 delta is the
    exact sum (zero-padding: of the padded products, with a trained A the padded average of the As)."""
    state = _state(scheme)
    gammas, gs = (4.0, 2.0, 1.0), 1.5
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    A0, B0, base = client_start_hetero(scheme, state, RANKS, gammas, gs)
    for i, r in enumerate(RANKS):
        torch.testing.assert_close(A0["l"][i, :r], state.A["l"][:r])  # round 1: the A init's leading rows
        assert torch.count_nonzero(A0["l"][i, r:]) == 0 and torch.count_nonzero(B0["l"][i]) == 0
    A1, B1 = _trained(A0, B0, train_a=scheme != "ffa")
    new, delta = aggregate_hetero(scheme, state, RANKS, A1, B1, p, gammas, gs)
    exact = sum(p[i] * gammas[i] * B1["l"][i] @ A1["l"][i] for i in range(3))
    if scheme == "fedit":  # product of averages: B moved and averaged, A averaged with zero padding
        b = sum(p[i] * gammas[i] / gs * B1["l"][i] for i in range(3))
        exact = gs * b @ sum(p[i] * A1["l"][i] for i in range(3))
    torch.testing.assert_close(delta["l"], exact)
    torch.testing.assert_close(total_delta(new, gs)["l"], exact)


def test_zero_pad_download_is_the_servers_model_on_the_clients_columns():
    state = _state("ffa")
    g = torch.Generator().manual_seed(4)
    state.B["l"] = torch.randn(6, 8, generator=g, dtype=torch.float64)
    gammas, gs = (4.0, 2.0, 1.0), 1.5
    A0, B0, base = client_start_hetero("ffa", state, RANKS, gammas, gs)
    assert base["l"] is state.merged["l"]
    for i, r in enumerate(RANKS):
        torch.testing.assert_close(gammas[i] * B0["l"][i] @ A0["l"][i], gs * state.B["l"][:, :r] @ state.A["l"][:r])


def test_svd_download_is_the_best_rank_r_approximation_of_the_global_change():
    state = _state("svd")
    g = torch.Generator().manual_seed(5)
    state.merged["l"] = torch.randn(6, 7, generator=g, dtype=torch.float64)
    gammas = (4.0, 2.0, 1.0)
    A0, B0, base = client_start_hetero("svd", state, RANKS, gammas, 1.0)
    assert torch.count_nonzero(base["l"]) == 0  # svd clients train on the pretrained weight
    u, s, vh = torch.linalg.svd(state.merged["l"], full_matrices=False)
    for i, r in enumerate(RANKS):
        best = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close(gammas[i] * B0["l"][i] @ A0["l"][i], best)
    # rank 8 > min(d, k) = 6: the two rows without a singular value take the A init's rows, B's columns 0
    torch.testing.assert_close(A0["l"][2, 6:], state.A["l"][6:8])
    assert torch.count_nonzero(B0["l"][2, :, 6:]) == 0


# -------------------------------------------------------------------------------------------------- runs
def test_equal_client_ranks_reproduce_the_homogeneous_run():
    for scheme in ("ffa", "fedit", "exact"):
        cfg = synth(scheme=scheme, rule="sfed", n_clients=3, rank=4)
        a = run(cfg)
        b = run(dataclasses.replace(cfg, client_ranks=(4, 4, 4)))
        for c in ("gamma", "update_fro", "adapter_rms", "grad_A_end", "grad_B_end", "eval_loss", "rho_ratio"):
            np.testing.assert_allclose(b[c].to_numpy(), a[c].to_numpy(), rtol=1e-9, atol=1e-14, err_msg=c)
        assert "client_ranks" not in a and (b["client_ranks"] == "4,4,4").all()


@pytest.mark.parametrize("scheme", ["ffa", "fedit", "exact", "svd"])
@pytest.mark.parametrize("rule", ["lora", "rslora", "sfed", "sfed-hetero"])
def test_hetero_run_records_the_rules_gammas_and_size(scheme, rule):
    cfg = hetero(scheme=scheme, rule=rule)
    df = run(cfg)
    assert not df["diverged"].any() and (df["update_fro"] > 0).all()
    want = sfed_theory.client_scaling_factors(rule, cfg.alpha, RANKS, scheme={"exact": "stack", "svd": "svd"}.get(
        scheme, "zero-pad"), train_a=scheme != "ffa")
    row = df[df.layer == "__all__"].iloc[0]
    assert row["gamma"] == pytest.approx(want.server)
    assert [float(g) for g in row["gamma_clients"].split(",")] == pytest.approx(want.clients)
    assert row["size_pred"] == pytest.approx(want.size) and row["client_ranks"] == "2,4,8"
    r1 = df[(df["round"] == 1) & (df.layer == "__all__")].iloc[0]
    if scheme != "fedit":  # the server's aggregate is the exact sum of the clients' own updates
        assert r1["agg_error"] <= 1e-12 * r1["update_fro"]


def test_batched_equals_loop_with_client_ranks_and_partial_participation():
    cfg = hetero(n_clients=4, client_ranks=(2, 8, 4, 8), participating=2, rounds=3, scheme="fedit", rule="sfed")
    task = build_task(cfg)
    a = run(cfg, task)
    b = run(dataclasses.replace(cfg, batched=False), task)
    # the sampled clients' ranks change from round to round, and so does the server's gamma
    per_round = a[a.layer == "__all__"].set_index("round")
    for rnd, row in per_round.iterrows():
        ranks = [cfg.client_ranks[int(c)] for c in row["clients"].split(",")]
        want = sfed_theory.client_scaling_factors("sfed", cfg.alpha, ranks, scheme="zero-pad", train_a=True)
        assert row["gamma"] == pytest.approx(want.server)
    for c in ("gamma", "update_fro", "adapter_rms", "grad_B_end", "eval_loss"):
        np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), rtol=1e-7, atol=1e-12, err_msg=c)
    pd.testing.assert_series_equal(a["gamma_clients"], b["gamma_clients"])


# -------------------------------------------------------------------------------------------- exponents
def test_exponent_table_in_n_for_a_rank_mix(tmp_path, capsys):
    from sfed_theory.hetero_rules import size_exponent
    from validation.analysis import fit_exponents
    from validation.cli import main
    from validation.grid import load_results, run_grid
    from validation.hetero_analysis import fit_hetero_exponents

    grid = GridConfig(base=synth(rounds=1), n_clients=(2, 4, 6), rank_mixes=((2, 8),), rules=("lora", "sfed-hetero"),
                      seeds=(0, 1))
    assert not run_grid(grid, tmp_path, progress=False).failed
    df = load_results(tmp_path)
    fits = fit_hetero_exponents(df, n_boot=50)
    assert set(fits["quantity"]) == {"update_fro", "adapter_output"} and set(fits["mix"]) == {"2,8"}
    for rule, pred in fits.groupby("rule")["predicted_rho0"].first().items():
        assert pred == pytest.approx(size_exponent(rule, 16.0, (2, 8), (2, 4, 6), scheme="zero-pad"), abs=1e-12)
    assert fits.loc[fits.rule == "sfed-hetero", "predicted_rho0"].abs().max() < 1e-12  # derived: no collapse
    assert np.isfinite(fits["measured"]).all() and (fits["ci_low"] <= fits["ci_high"]).all()
    # the homogeneous table leaves these runs out; the CLI prints the table for them
    assert fit_exponents(df, n_boot=20, refined=False).empty  # one rank (8) at three N: it would fit a slope
    assert main(["analyze", str(tmp_path), "--n-boot", "20"]) == 0
    out = capsys.readouterr().out
    assert "rank mix {2,8}" in out and (tmp_path / "hetero_exponents.csv").is_file()


def test_committed_hetero_results_match_their_grid_and_draw(tmp_path):
    from paper_figures import experiments
    from paper_figures.hetero_figs import aggregate_sizes, fig_hetero_ranks

    df = experiments.load("hetero_ranks")
    assert set(df["run_id"]) == {c.run_id for c in experiments.spec("hetero_ranks").runs()}
    assert experiments.load_manifest()["hetero_ranks"]["harness"]["clean"] is True
    sizes = aggregate_sizes(df)
    derived = sizes[sizes.rule.str.startswith("sfed")]
    np.testing.assert_allclose(derived["size_pred"], 1.0)  # the SFed rules keep the aggregate's size at every N
    lora = sizes[sizes.rule == "lora"].sort_values("n_clients")
    assert lora["update_fro"].iloc[-1] < 0.7 * lora["update_fro"].iloc[0]  # LoRA's aggregate collapses with N
    (png,) = fig_hetero_ranks(df, tmp_path, formats=("png",), n_boot=50)
    assert png.read_bytes().startswith(b"\x89PNG")


def test_tuned_table_of_a_quick_hetero_sweep(tmp_path):
    from paper_figures import experiments
    from paper_figures.hetero_figs import fig_hetero_lr, tuned_table
    from paper_figures.lr_transfer import final_rows
    from validation.grid import load_results

    res = experiments.run_experiment("hetero_lr", "quick", tmp_path)
    assert res["written"] == res["runs"] == 9 and not res["failed"]
    df = load_results(tmp_path)
    t = tuned_table(df).set_index("rule")
    # by hand from the per-run final rows: the seed-mean final accuracy per lr, its best and that lr
    f = final_rows(df).groupby(["rule", "lr"]).eval_acc.mean()
    for rule in ("lora", "sfed", "sfed-hetero-shared"):
        acc = f.loc[rule]
        assert t.loc[rule, "best_acc"] == pytest.approx(acc.max())
        assert acc.loc[t.loc[rule, "lr_best"]] == pytest.approx(acc.max())
        assert t.loc[rule, "edge"] == (t.loc[rule, "lr_best"] in (acc.index.min(), acc.index.max()))
    assert (t["regret_lr_from_N=3"] == 0).all()  # one N: the lr tuned at the smallest N is the own best
    (png,) = fig_hetero_lr(df, tmp_path, formats=("png",))
    assert png.read_bytes().startswith(b"\x89PNG")
