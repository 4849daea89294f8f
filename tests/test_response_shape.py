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
    from validation.probe_inputs import mean_share_along
    from validation.response_shape import gradient_direction, gradient_input_shape

    for n, x in start.inputs.items():  # the probe gradient's own shape at the round's start
        cols = ["grad_rank1", "grad_input_share", "grad_spike_cos"]
        assert rows.loc[n, cols].tolist() == pytest.approx(gradient_input_shape(start.grad_W[n], x)[:3], rel=1e-6)
    one, one_state, _ = run(synth(rule="rslora", n_clients=1, rank=4, rounds=1, scheme="ffa"), return_state=True)
    one_rows = one[one.layer != ALL].set_index("layer")
    for n in start.inputs:  # N = 1: the state's B is the client's increment (B starts at 0); same A and probe
        want = mean_share_along(one_state.B[n][None], st0.A[n], gradient_direction(start.grad_W[n]))
        assert one_rows.loc[n, "inc_B_coherent_grad"] == pytest.approx(want, rel=1e-6)
    fedsa, _, _ = run(synth(rule="rslora", n_clients=2, rank=4, rounds=1, scheme="fedsa"), return_state=True)
    assert fedsa[["response_top_input", "response_alignment"]].isna().all().all()


def test_predicted_top_input_matches_a_simulation_of_the_model():
    """The model's share read off the derived ``E||dL/dB_end||^2`` against the same ratio of expectations
    sampled from the refined model itself (FFA: B's increments a coherent share ``u_i (A x)^T`` plus correlated
    isotropic noise, ``dG = dW (x x^T + nu I)``)."""
    import numpy as np

    from validation.refined import RefinedParams
    from validation.response_shape import predicted_top_input

    d = k = 16
    r, kk, f_in, phi, nu, rho, s_b = 4, 3, 0.3, 0.2, 0.2, 0.1, 0.01
    p = RefinedParams(scheme="ffa", partition="iid", f_in=f_in, phi=phi, rho_f=rho * (1 - f_in) + f_in * phi,
                      lam=3.0, tau2x2={r: 0.002}, s_B={"rslora": s_b}, s_dA={"rslora": 0.0}, d=d, k=k,
                      pilot_max_n=4, n_pilot_points=0, rms_log_residual=0.0, nu=nu)
    want = float(predicted_top_input(p, "rslora", [r], [kk], 8.0)[0])
    rng = np.random.default_rng(0)
    s, s_a, tau = 40_000, 1 / np.sqrt(3 * k), np.sqrt(0.002)
    x = np.zeros(k)
    x[0] = 1.0
    a = s_a * rng.standard_normal((s, r, k))
    g = tau * rng.standard_normal((s, d))
    u = -np.sqrt(phi) * g[:, None] / tau + np.sqrt(1 - phi) * rng.standard_normal((s, kk, d))
    iso = np.sqrt(rho) * rng.standard_normal((s, 1, d, r)) + np.sqrt(1 - rho) * rng.standard_normal((s, kk, d, r))
    ax = a @ x
    b = (np.sqrt(f_in) * s_b / s_a * u[..., None] * ax[:, None, None, :] + np.sqrt(1 - f_in) * s_b * iso).mean(1)
    dw = b @ a
    dg = (dw @ x)[:, :, None] * x + nu * dw
    num = np.sum((dg @ x) ** 2, axis=1) * np.sum(ax**2, axis=1)
    den = np.sum((dg @ np.swapaxes(a, 1, 2)) ** 2, axis=(1, 2))
    got = num.mean() / den.mean()
    se = got * np.sqrt(np.var(num / num.mean() - den / den.mean()) / s)  # delta method for a ratio of means
    assert abs(got - want) < 4 * se, (got, want, se)
    assert 0.05 < want < 0.95  # neither the spike alone nor the bulk alone: a real test of both terms


def test_gradient_input_shape_by_hand():
    """G = g x_g^T + a small second term: the rank-one share is s1^2 / (s1^2 + s2^2); tokens with C = diag(9, 1)
    (spike e1) and x_g = (1, 1)/sqrt(2): the input share is (9 + 1)/2 / 10 = 1/2 and |cos(x_g, e1)| = 1/sqrt(2)."""
    from validation.response_shape import gradient_direction, gradient_input_shape

    xg = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    other = torch.tensor([1.0, -1.0]) / math.sqrt(2)
    g = 3 * torch.outer(torch.tensor([1.0, 0.0, 0.0]), xg) + torch.outer(torch.tensor([0.0, 1.0, 0.0]), other)
    x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    rank1, share, cos, direction = gradient_input_shape(g, x)
    assert rank1 == pytest.approx(9 / 10)  # a root (3/4) fails
    assert share == pytest.approx(0.5)
    assert cos == pytest.approx(1 / math.sqrt(2))
    assert abs(float(gradient_direction(g) @ xg.double())) == pytest.approx(1.0)
    assert torch.equal(direction, gradient_direction(g))  # the same decomposition's x_g
    with pytest.raises(ValueError, match="non-zero"):
        gradient_direction(torch.zeros(2, 2))


def test_mean_share_along_a_given_direction_by_hand():
    """r = 2, A = I: an increment along A x_g = e1 has share 1; one along e2 -1 (the 1/r removed: (0 - 1/2)/(1/2));
    the clients' mean, with a zero increment left out."""
    from validation.probe_inputs import mean_share_along

    inc = torch.tensor([[[2.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert mean_share_along(inc, torch.eye(2), torch.tensor([1.0, 0.0])) == pytest.approx(0.0)
    assert mean_share_along(inc[:1], torch.eye(2), torch.tensor([5.0, 0.0])) == pytest.approx(1.0)
    half = torch.tensor([1.0, 1.0]) / math.sqrt(2)  # an increment along e1 has half its energy along it: share 0
    assert mean_share_along(inc[:1], torch.eye(2), half) == pytest.approx(0.0)
    assert math.isnan(mean_share_along(torch.ones(2, 3, 1), torch.ones(1, 2), torch.ones(2)))


def test_predicted_top_input_refuses_the_two_vector_model():
    """Its reading of the lam^2 coefficient assumes the response goes through the spike; with two vectors it
    goes through the gradient's direction, and the same arithmetic would return (1 + nu)^2, a wrong number."""
    from validation.refined import RefinedParams
    from validation.response_shape import predicted_top_input

    p = RefinedParams(scheme="ffa", partition="iid", f_in=0.2, phi=0.1, rho_f=0.05, lam=3.0, tau2x2={4: 0.002},
                      s_B={"rslora": 0.01}, s_dA={"rslora": 0.0}, d=8, k=8, pilot_max_n=4, n_pilot_points=0,
                      rms_log_residual=0.0, nu=0.2, kappa=0.5, nu_g=0.1)
    with pytest.raises(ValueError, match="one-vector model"):
        predicted_top_input(p, "rslora", [4], [3], 8.0)


def test_a_given_top_direction_is_the_one_used():
    """The harness decomposes the tokens' second moment once per layer and passes its top direction on: with
    ``top=top_direction(x)`` each measurement equals its own computation; with another direction it differs
    (so ``top`` is not ignored)."""
    from validation.probe_inputs import mean_coherent_shares, top_direction
    from validation.response_shape import gradient_input_shape, response_shape

    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(6, 5, generator=g), torch.randn(3, 5, generator=g)
    dg, dw, inc = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(2, 4, 3, generator=g)
    top, other = top_direction(x), torch.eye(5, dtype=torch.float64)[0]
    measurements = (lambda t: response_shape(dg, dw, a, x, top=t), lambda t: gradient_input_shape(dg, x, top=t)[:3],
                    lambda t: mean_coherent_shares(inc, a, x, top=t))
    for measure, own in zip(measurements, (response_shape(dg, dw, a, x), gradient_input_shape(dg, x)[:3],
                                           mean_coherent_shares(inc, a, x))):
        assert measure(top) == pytest.approx(own, rel=1e-12)
        assert measure(other) != pytest.approx(own, rel=1e-3)
