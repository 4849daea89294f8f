"""The probe-input measurements behind the refined model's nu, against hand computations."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from validation.config import RunConfig
from paper_figures.probe_input_table import probe_input_table
from validation.probe_inputs import (bulk_nu, coherent_share, mean_coherent_share, mean_token_share,
                                     probe_coherent_share, probe_nu, top_share)


def test_top_share_is_the_top_eigenvalue_over_the_energy():
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # X^T X = diag(4, 1, 1)
    assert top_share(x) == pytest.approx(4 / 6)  # a root taken (2/4) or a square (16/18) fails
    assert top_share(torch.ones(5, 3)) == pytest.approx(1.0)  # every token on one line
    assert top_share(torch.eye(4)) == pytest.approx(1 / 4)  # isotropic


def test_mean_token_share_by_hand():
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # mean (1, 0): 2 * 1 of the energy 4
    assert mean_token_share(x) == pytest.approx(0.5)
    assert mean_token_share(x - x.mean(0)) == pytest.approx(0.0)


def test_bulk_nu_inverts_the_models_second_moment():
    k, nu, x2 = 6, 0.3, 2.0
    v = torch.zeros(k, dtype=torch.float64)
    v[0] = math.sqrt(x2)
    c = torch.outer(v, v) + nu * torch.eye(k, dtype=torch.float64)  # C = x x^T + nu I
    share = float(torch.linalg.eigvalsh(c)[-1] / torch.trace(c))
    assert bulk_nu(share, k, x2) == pytest.approx(nu)
    assert bulk_nu(1.0, k) == 0.0  # one probe vector
    with pytest.raises(ValueError, match="no spike"):
        bulk_nu(1 / k, k)
    with pytest.raises(ValueError, match="share"):
        bulk_nu(1.2, k)


def test_bad_token_rows_are_refused():
    with pytest.raises(ValueError, match="n_tokens, k"):
        top_share(torch.ones(3))
    with pytest.raises(ValueError, match="all zero"):
        top_share(torch.zeros(2, 3))


def test_probe_input_table_on_the_synthetic_task():
    cfg = RunConfig(model="synthetic", dataset="synthetic", n_clients=1, rank=2, probe_size=16, device="cpu")
    t = probe_input_table(cfg, seeds=[0, 1])
    assert set(t.seed) == {0, 1} and (t.n_tokens == 16).all()
    assert ((t.top_share > 1 / t.k) & (t.top_share <= 1)).all()
    assert (t.mean_token_share <= t.top_share + 1e-12).all()  # the mean direction is one direction
    assert probe_nu(t) == pytest.approx(bulk_nu(float(t.top_share.mean()), int(t.k.iloc[0])))


def test_the_real_models_probe_inputs_have_a_spike():
    """MiniLM's hidden states share a mean direction: the top share is far above isotropic (1/k), and the
    mean token carries most of it (the default task measures 0.14 and 0.13, docs/THEORY.md)."""
    cfg = RunConfig(n_clients=1, rank=4, probe_size=4, max_length=16, eval_size=8, device="cpu")
    t = probe_input_table(cfg, seeds=[0])
    assert len(t) == 12 and (t.k == 384).all()
    assert (t.top_share > 10 / t.k).all() and (t.mean_token_share > 0.5 * t.top_share).mean() > 0.5


def test_the_harness_records_the_probes_top_share_at_the_rounds_start():
    """The probe is a property of the seed: at round 1 its top share is the same at every N, rank and rule
    (B = 0, so the base model's inputs), and the __all__ row is the layers' mean."""
    from test_harness_helpers import synth
    from validation.analysis import measured_nu
    from validation.federated import run
    from validation.metrics import ALL

    df = pd.concat([run(synth(rule=rule, n_clients=n, rank=r, rounds=1, scheme=s))
                    for rule, n, r, s in (("lora", 1, 2, "ffa"), ("sfed", 3, 4, "fedsa"), ("rslora", 2, 4, "fedit"))])
    per_layer = df[df.layer != ALL].groupby("layer").probe_top_share
    assert (per_layer.nunique() == 1).all()
    top = df[df.layer == ALL].probe_top_share
    assert top.nunique() == 1 and top.iloc[0] == pytest.approx(per_layer.first().mean())
    assert measured_nu(df[df.layer == ALL]) == pytest.approx(bulk_nu(float(top.iloc[0]), int(df.k_in.iloc[-1])))
    with pytest.warns(UserWarning, match="probe_top_share"):
        assert measured_nu(df[df.layer == ALL].drop(columns="probe_top_share")) == 0.0
    grad = df[df.layer == ALL].grad_input_share  # the tokens' share along the gradient's direction: per seed too
    assert grad.nunique() == 1
    assert measured_nu(df[df.layer == ALL], "grad_input_share") == pytest.approx(
        bulk_nu(float(grad.iloc[0]), int(df.k_in.iloc[-1])))
    with pytest.raises(ValueError, match="lack grad_input_share"):
        measured_nu(df[df.layer == ALL].drop(columns="grad_input_share"), "grad_input_share")
    with pytest.raises(ValueError, match="column must be"):
        measured_nu(df[df.layer == ALL], "top_share")


def test_coherent_share_by_hand():
    a = torch.eye(2)  # A x_top = e1 for tokens along e1
    x = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert coherent_share(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), a, x) == pytest.approx(1.0)  # dB = u v^T
    assert coherent_share(torch.tensor([[1.0, 1.0]]), a, x) == pytest.approx(0.0)  # half on v: the 1/r of no structure
    assert coherent_share(torch.tensor([[0.0, 1.0]]), a, x) == pytest.approx(-1.0)  # avoids v
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    assert abs(coherent_share(noise, torch.randn(8, 5, generator=g), torch.randn(50, 5, generator=g))) < 0.01
    with pytest.raises(ValueError, match="r >= 2"):
        coherent_share(torch.ones(3, 1), torch.ones(1, 4), x)


def test_mean_coherent_share_by_hand():
    """Two clients with their own A: one increment along its own A x_top (share 1), one across it (-1); a
    shared A broadcasts; a zero increment is left out; rank 1 has no direction to prefer."""
    x = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # x_top = e1
    a = torch.stack([torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])])  # client 1: A x_top = e2
    inc = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[1.0, 0.0], [2.0, 0.0]]])  # both along e1
    assert mean_coherent_share(inc, a, x) == pytest.approx(0.0)  # (1 + (-1)) / 2
    assert mean_coherent_share(inc, torch.eye(2), x) == pytest.approx(1.0)  # one shared A
    assert mean_coherent_share(torch.stack([inc[0], torch.zeros(2, 2)]), a, x) == pytest.approx(1.0)
    assert math.isnan(mean_coherent_share(torch.ones(2, 3, 1), torch.ones(1, 2), x))
    with pytest.raises(ValueError, match="increments"):
        mean_coherent_share(inc[0], a, x)


def test_the_harness_records_the_increments_coherent_share():
    """``inc_B_coherent`` is the clients' mean coherent share of their B increments, per layer, recomputed
    here from a run's own state: under FedSA each client's own B, under FFA at N = 1 the client's B (at N > 1
    the state keeps only the average, which is not what the column measures)."""
    from test_harness_helpers import synth
    from validation.federated import _setup, run
    from validation.metrics import ALL

    for scheme, n_clients in (("ffa", 1), ("fedsa", 3)):
        cfg = synth(rule="rslora", n_clients=n_clients, rank=4, rounds=1, scheme=scheme)
        df, state, _ = run(cfg, return_state=True)
        ctx, st0, _ = _setup(cfg, None)
        inputs = ctx.backend.probe(st0.A, st0.B, *ctx.probe, capture=True).inputs
        rows = df[df.layer != ALL].set_index("layer")
        for n, x in inputs.items():
            b1 = state.B_local[n] if state.B_local is not None else state.B[n][None]
            assert rows.loc[n, "inc_B_coherent"] == pytest.approx(mean_coherent_share(b1, st0.A[n], x), rel=1e-6)
            want = mean_coherent_share(b1, st0.A[n], x, whole_spectrum=True)
            assert rows.loc[n, "inc_B_coherent_probe"] == pytest.approx(want, rel=1e-6)
        for col in ("inc_B_coherent", "inc_B_coherent_probe"):
            assert df[df.layer == ALL][col].iloc[0] == pytest.approx(rows[col].mean())


def test_probe_coherent_share_by_hand():
    """The share that reproduces an increment's alignment with the probe's whole spectrum. C = diag(13, 4, 1),
    A = I: tr M = 18, peak = 3 * 13 / 18. Along the bulk's second direction the output sees 4 of 18, so
    f = (3 * 4 / 18 - 1) / (39 / 18 - 1) = -2/7, where the top-direction share says -1/2 (it sees 0 there)."""
    x = torch.tensor([[3.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    a = torch.eye(3)
    assert probe_coherent_share(torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]), a, x) == pytest.approx(1.0)
    assert probe_coherent_share(torch.tensor([[0.0, 1.0, 0.0]]), a, x) == pytest.approx(-2 / 7)
    assert coherent_share(torch.tensor([[0.0, 1.0, 0.0]]), a, x) == pytest.approx(-1 / 2)
    assert probe_coherent_share(torch.tensor([[0.0, 0.0, 1.0]]), a, x) == pytest.approx(-5 / 7)
    assert probe_coherent_share(torch.tensor([[1.0, 1.0, 1.0]]), a, x) == pytest.approx(0.0)  # isotropic
    two = torch.stack([torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])])
    assert mean_coherent_share(two, a, x, whole_spectrum=True) == pytest.approx((-2 / 7 + 1) / 2)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    assert abs(probe_coherent_share(noise, torch.randn(8, 5, generator=g), torch.randn(50, 5, generator=g))) < 0.05


def test_measured_kappa_is_the_root_mean_square_of_the_per_layer_cosines():
    """By hand: per-layer |cos| 0.3 and 0.4 (the __all__ row and other rounds ignored) give
    sqrt((0.09 + 0.16) / 2) = 0.35355; a mean (0.35) or the __all__ row (0.9) would fail."""
    from validation.analysis import measured_kappa
    from validation.metrics import ALL

    rows = pd.DataFrame({"layer": ["q", "v", ALL, "q"], "round": [1, 1, 1, 2],
                         "grad_spike_cos": [0.3, 0.4, 0.9, 0.1]})
    assert measured_kappa(rows) == pytest.approx(0.353553, abs=1e-6)
    assert measured_kappa(rows, round=2) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lack grad_spike_cos"):
        measured_kappa(rows.drop(columns="grad_spike_cos"))
    with pytest.raises(ValueError, match="no per-layer"):
        measured_kappa(rows, round=3)
    with pytest.raises(ValueError, match="must lie in"):
        measured_kappa(rows.assign(grad_spike_cos=[0.3, 1.4, 0.9, 0.1]))
