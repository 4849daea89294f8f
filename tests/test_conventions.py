"""Conventions the harness, the predictor and the analysis must share, each pinned by a test:
K (the clients averaged) is a rule's N everywhere, and unequal client weights reach every scheme's
aggregation and sfed-general's gamma."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import sfed_theory
from sfed_theory.predict import predicted_exponent, predicted_norm
from test_harness_helpers import synth
from validation.aggregation import aggregate, init_state
from validation.analysis import fit_exponents
from validation.federated import client_parts, run
from validation.models import build_task


@pytest.mark.parametrize("rule", ["sfed", "rslora", "sfed-general"])
def test_partial_participation_gamma_is_taken_at_k_in_harness_and_predictor(rule):
    cfg = synth(n_clients=4, participating=2, rule=rule, rounds=1)
    df = run(cfg)
    kw = {"participating": 2} if rule == "sfed-general" else {}
    gamma_k = sfed_theory.scaling_factor(rule, cfg.alpha, cfg.rank, 4 if kw else 2, **kw)
    assert df["gamma"].iloc[0] == pytest.approx(gamma_k)
    # the predictor at (N = 4, K = 2) is the predictor at (N = 2, K = 2): only K enters
    a = predicted_norm("update_fro", rule, rank=4, n_clients=4, participating=2, d=16, k=16)
    b = predicted_norm("update_fro", rule, rank=4, n_clients=2, d=16, k=16)
    assert a == pytest.approx(b, rel=1e-12)


def test_analysis_passes_k_to_the_predictor(tmp_path):
    rows = [run(synth(n_clients=n, participating=2, rule="rslora", rounds=1, seed=s))
            for n in (2, 4) for s in (0, 1)]
    import pandas as pd

    fits = fit_exponents(pd.concat(rows), n_boot=50)
    f = fits[(fits.quantity == "update_fro") & (fits.wrt == "n_clients")].iloc[0]
    # K = 2 at both points: rsLoRA's update does not depend on N (it would fall as N^-0.5 with K = N)
    assert f.predicted_rho0 == pytest.approx(0.0, abs=1e-12)
    assert predicted_exponent("update_fro", "rslora", wrt="n_clients", ranks=4, n_clients=[2, 4]) == \
        pytest.approx(-0.5)


def _client_tensors(K: int, d: int, k: int, r: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(3)
    A = {"l": torch.randn(K, r, k, generator=g, dtype=torch.float64)}
    B = {"l": torch.randn(K, d, r, generator=g, dtype=torch.float64)}
    return A, B


@pytest.mark.parametrize("scheme", ["fedit", "fedsa", "ffa", "exact"])
def test_every_scheme_aggregates_with_unequal_weights(scheme):
    K, d, k, r, gamma = 3, 4, 5, 2, 1.7
    p = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    state = init_state({"l": (d, k)}, r, K, scheme, 0, p, torch.float64, torch.device("cpu"))
    A, B = _client_tensors(K, d, k, r)
    if scheme == "ffa":
        A = {"l": state.A["l"].expand(K, r, k).clone()}
    new, delta = aggregate(scheme, state, [0, 1, 2], A, B, p, gamma)
    wa = sum(p[i] * A["l"][i] for i in range(K))
    wb = sum(p[i] * B["l"][i] for i in range(K))
    if scheme == "fedit":
        torch.testing.assert_close(new.A["l"], wa)
        torch.testing.assert_close(new.B["l"], wb)
        torch.testing.assert_close(delta["l"], gamma * wb @ wa)
    elif scheme == "ffa":
        torch.testing.assert_close(new.B["l"], wb)
        torch.testing.assert_close(delta["l"], gamma * wb @ state.A["l"])
    elif scheme == "fedsa":
        torch.testing.assert_close(new.A["l"], wa)
        torch.testing.assert_close(new.B_local["l"], B["l"])
        # the shared (evaluated) adapter weighs the local Bs with the same client weights
        torch.testing.assert_close(delta["l"], gamma * wb @ wa)
    else:
        torch.testing.assert_close(new.merged["l"], gamma * sum(p[i] * B["l"][i] @ A["l"][i] for i in range(K)))
    # the equal-weight answer differs: dropping the weights would fail the checks above
    eq = torch.full((K,), 1 / K, dtype=torch.float64)
    assert not torch.allclose(sum(eq[i] * B["l"][i] for i in range(K)), wb)


@pytest.mark.parametrize("scheme", ["fedsa", "ffa"])
def test_weighted_run_uses_data_sizes_for_gamma_and_aggregation(scheme):
    cfg = synth(n_clients=4, rule="sfed-general", weighted=True, partition="dirichlet", dirichlet_alpha=0.3,
                rounds=1, scheme=scheme)
    sizes = np.array([len(x) for x in client_parts(cfg, build_task(cfg))], dtype=float)
    assert sizes.std() > 0  # the split really is unequal
    df, state, _ = run(cfg, return_state=True)
    want = sfed_theory.scaling_factor("sfed-general", cfg.alpha, cfg.rank, 4, weights=sizes)
    assert df["gamma"].iloc[0] == pytest.approx(want)
    assert want != pytest.approx(sfed_theory.scaling_factor("sfed-general", cfg.alpha, cfg.rank, 4))
    torch.testing.assert_close(state.client_weights, torch.as_tensor(sizes / sizes.sum()))
    unweighted = run(dataclasses.replace(cfg, weighted=False))
    assert not np.allclose(df["update_fro"].to_numpy(), unweighted["update_fro"].to_numpy())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("scheme", ["ffa", "fedit", "fedsa", "exact"])
def test_measured_zero_pattern_matches_the_closed_forms(scheme, optimizer):
    """The harness measures each scheme's quantities at the point the theory derives them for: a
    quantity is measured exactly zero if and only if its closed form is identically zero. The SGD
    model is one local step from B = 0 (A cannot move in it), so the SGD run takes one step."""
    from sfed_theory.derivation import closed_form
    from validation.analysis import OPTIMIZER_REGIME, QUANTITY_COLUMNS

    df = run(synth(scheme=scheme, optimizer=optimizer, rounds=1, n_clients=3,
                   local_steps=1 if optimizer == "sgd" else 2))
    row = df[df.layer == "__all__"].iloc[0]
    columns = {**QUANTITY_COLUMNS, "aggregation_error": "agg_error"}
    checked = 0
    for quantity, col in columns.items():
        if quantity == "aggregation_error" and scheme == "fedsa":
            assert np.isnan(row[col])  # not defined: FedSA has no global update
            continue
        zero = closed_form(quantity, scheme, OPTIMIZER_REGIME[optimizer]) == 0
        scale = max(row["update_fro"], 1e-300)
        assert (abs(row[col]) <= 1e-12 * scale) == bool(zero), (quantity, row[col])
        checked += 1
    assert checked >= 4
