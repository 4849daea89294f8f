"""The shape of the probe gradient's response to the round's update, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from validation.response_shape import response_shape


def test_top_input_share_by_hand():
    """Tokens x = (2, 0) twice and (0, 1): the top input direction is e1. A = [[1, 1]] (r = 1, ||A v||^2 = 1);
    dG = [[1, 2]]: dG v = 1, dG A^T = 3, so the share is 1 * 1 / 9. A share without the squares (1/3) or
    without ||A v||^2 fails."""
    x = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[1.0, 1.0]])
    top, _ = response_shape(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]), a, x)
    assert top == pytest.approx(1 / 9)
    top, _ = response_shape(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]), 2 * a, x)
    assert top == pytest.approx(1 / 9)  # A's scale cancels
    top, _ = response_shape(torch.tensor([[3.0, 0.0], [4.0, 0.0]]), torch.ones(2, 2), torch.tensor([[1.0, 5.0]]), x)
    assert top == pytest.approx(1.0)  # a change u v^T comes only through v, whatever A is


def test_output_alignment_by_hand():
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # v = e1
    a = torch.eye(2)
    dw = torch.tensor([[1.0, 7.0], [1.0, -3.0]])  # dW v = (1, 1)
    _, cos = response_shape(torch.tensor([[1.0, 5.0], [0.0, 5.0]]), dw, a, x)  # dG v = (1, 0)
    assert cos == pytest.approx(1 / math.sqrt(2))
    _, cos = response_shape(-3 * dw, dw, a, x)
    assert cos == pytest.approx(-1.0)  # a negative curvature turns the response against the change


def test_the_refined_models_response_is_aligned_and_shares_the_bulk():
    """The model's ``dG = lam dW C`` with ``C = x x^T + nu I`` (tokens: the spike plus an isotropic bulk) is
    aligned with the output change (cos 1, any dW), and its top-input share is the spike's part of
    ``||dW C A^T||^2``, computed here the long way."""
    torch.manual_seed(0)
    d, k, r, nu = 5, 4, 2, 0.3
    x = torch.cat([torch.tensor([[3.0, 0.0, 0.0, 0.0]]), math.sqrt(nu) * torch.eye(k)]).double()
    c = x.T @ x  # diag(9 + nu, nu, nu, nu)
    dw, a = torch.randn(d, k, dtype=torch.float64), torch.randn(r, k, dtype=torch.float64)
    top, cos = response_shape(2.5 * dw @ c, dw, a, x)
    assert cos == pytest.approx(1.0)
    v = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    spike = (9 + nu) ** 2 * float((dw @ v).pow(2).sum()) * float((a @ v).pow(2).sum())
    assert top == pytest.approx(spike / float((dw @ c @ a.T).pow(2).sum()))
    assert top != pytest.approx(1.0)  # the bulk's part
    spike_only = x[:1]  # no bulk: the whole change comes through v
    top, _ = response_shape(dw @ spike_only.T @ spike_only, dw, a, spike_only)
    assert top == pytest.approx(1.0)


def test_degenerate_inputs_give_nan_or_an_error():
    x = torch.tensor([[1.0, 0.0]])
    top, cos = response_shape(torch.zeros(2, 2), torch.ones(2, 2), torch.eye(2), x)
    assert math.isnan(top) and math.isnan(cos)  # no change
    top, cos = response_shape(torch.ones(2, 2), torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.eye(2), x)
    assert top == pytest.approx(0.5) and math.isnan(cos)  # the update misses v
    with pytest.raises(ValueError, match="dG and dW"):
        response_shape(torch.ones(2, 2), torch.ones(2, 3), torch.eye(2), x)


def test_the_harness_records_the_response_shape():
    """``response_top_input`` and ``response_alignment`` recomputed from a run's own probes (FFA, one round:
    ``dW = gamma B A`` from B = 0); NaN under FedSA, which has no shared update."""
    from test_harness_helpers import synth
    from validation.federated import _setup, run
    from validation.metrics import ALL

    cfg = synth(rule="rslora", n_clients=2, rank=4, rounds=1, scheme="ffa")
    df, state, _ = run(cfg, return_state=True)
    ctx, st0, _ = _setup(cfg, None)
    start = ctx.backend.probe(st0.A, st0.B, *ctx.probe, grads=True, capture=True)
    ctx.backend.set_base_delta(state.merged)
    end = ctx.backend.probe(state.A, state.B, *ctx.probe, grads=True, capture=True)
    gamma = float(df.gamma.iloc[0])
    rows = df[df.layer != ALL].set_index("layer")
    for n, x in start.inputs.items():
        want = response_shape(end.grad_W[n] - start.grad_W[n], gamma * state.B[n] @ state.A[n], st0.A[n], x)
        assert rows.loc[n, ["response_top_input", "response_alignment"]].tolist() == pytest.approx(want, rel=1e-6)
    for col in ("response_top_input", "response_alignment"):
        assert df[df.layer == ALL][col].iloc[0] == pytest.approx(rows[col].mean())
    fedsa, _, _ = run(synth(rule="rslora", n_clients=2, rank=4, rounds=1, scheme="fedsa"), return_state=True)
    assert fedsa[["response_top_input", "response_alignment"]].isna().all().all()
