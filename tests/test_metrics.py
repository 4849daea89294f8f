"""Each metric of validation.metrics against a hand computation on small tensors.

The numbers in these tests are worked out by hand (in the comments), so a metric that squares,
drops a root, counts the diagonal or ignores the weights fails here, not only in a plumbing test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from validation.metrics import (ALL, LayerRound, combine_layers, cosine_rho, gram, layer_metrics, n_eff_from_rho,
                                output_rms, ratio_rho, weighted_norm)

T = lambda *a: torch.tensor(a, dtype=torch.float64)  # noqa: E731


def test_update_norm_is_the_frobenius_norm_not_its_square():
    assert weighted_norm(T([3.0, 4.0], [0.0, 0.0]), T(1.0), per_client=False) == pytest.approx(5.0)
    # per client (FedSA): sqrt(0.25 * 5^2 + 0.75 * 1^2) = sqrt(7)
    x = torch.stack([T([3.0, 4.0]), T([1.0, 0.0])])
    assert weighted_norm(x, T(0.25, 0.75), per_client=True) == pytest.approx(math.sqrt(7.0))


def test_adapter_rms_is_the_root_of_the_mean_square():
    total = T([1.0, 0.0], [0.0, 2.0])  # (d, k)
    rows = T([1.0, 1.0], [2.0, 0.0])  # outputs: (1, 2) and (2, 0); mean square (1+4+4+0)/4 = 9/4
    assert output_rms(total, rows, T(1.0), per_client=False) == pytest.approx(1.5)
    # per client with weights: client 2's update is twice client 1's -> ms 9/4 and 9; 0.5*9/4 + 0.5*9 = 45/8
    both = torch.stack([total, 2 * total])
    assert output_rms(both, rows, T(0.5, 0.5), per_client=True) == pytest.approx(math.sqrt(45 / 8))


def test_pairwise_cosine_excludes_the_diagonal():
    g = gram(T([1.0, 0.0], [1.0, 1.0]))
    assert cosine_rho(g) == pytest.approx(1 / math.sqrt(2))  # counting the diagonal would give 0.854
    # three clients: cosines (1,2)=0, (1,3)=(2,3)=1/sqrt2 -> mean sqrt2/3
    g3 = gram(T([1.0, 0.0], [0.0, 1.0], [1.0, 1.0]))
    assert cosine_rho(g3) == pytest.approx(math.sqrt(2) / 3)
    assert math.isnan(cosine_rho(gram(T([1.0, 2.0]))))


def test_ratio_rho_by_hand_equal_and_unequal_weights():
    x = T([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])  # Gram [[1,0,1],[0,1,1],[1,1,2]]
    g = gram(x)
    # equal weights: off-diagonal mass 2*(0+1+1) = 4 over 2*(1 + 1.5 + 1.5) = 8
    assert ratio_rho(g, T(1 / 3, 1 / 3, 1 / 3)) == pytest.approx(0.5)
    # weights (1, 1, 2): pair weights 1, 2, 2 -> 2*(0 + 2 + 2) / 2*(1 + 3 + 3) = 4/7
    assert ratio_rho(g, T(0.25, 0.25, 0.5)) == pytest.approx(4 / 7)
    # anti-correlated clients give a negative estimate, reported unclipped
    assert ratio_rho(gram(T([1.0, 2.0], [-1.0, -2.0])), T(0.5, 0.5)) == pytest.approx(-1.0)


def test_n_eff_with_unequal_weights_and_negative_rho():
    p = T(0.5, 0.25, 0.25)  # S2 = 0.375
    assert n_eff_from_rho(0.2, p) == pytest.approx(1 / (0.2 + 0.8 * 0.375))  # = 2.0
    eq = T(1 / 3, 1 / 3, 1 / 3)
    assert n_eff_from_rho(-0.2, eq) == pytest.approx(5.0)  # 1 / (-0.2 + 1.2/3): more than K = 3
    assert math.isnan(n_eff_from_rho(-0.6, eq))  # below -1/(K-1): undefined
    assert n_eff_from_rho(float("nan"), T(1.0)) == 1.0
    # with equal weights the ratio estimate's N_eff is exactly the measured shrinkage of the mean
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(4, 50)) + 0.3)
    rho = ratio_rho(gram(x), torch.full((4,), 0.25, dtype=torch.float64))
    shrink = float(x.pow(2).sum(1).mean() / x.mean(0).pow(2).sum())
    assert n_eff_from_rho(rho, torch.full((4,), 0.25, dtype=torch.float64)) == pytest.approx(shrink, rel=1e-12)


def _ffa_round(B1: torch.Tensor, A: torch.Tensor, G: torch.Tensor, p: torch.Tensor, gamma: float,
               x: torch.Tensor, G_start: torch.Tensor | None = None) -> LayerRound:
    """One FFA round from B = 0 with hand-chosen tensors (A shared and frozen)."""
    K = B1.shape[0]
    A0 = A.expand(K, *A.shape).clone()
    Bbar = torch.tensordot(p, B1, dims=1)
    dW = gamma * Bbar @ A
    z = torch.zeros(1, dtype=torch.float64)
    return LayerRound(z, z, gamma * Bbar.T @ G, gamma * G @ A.T, G_start if G_start is not None else G, G, dW, dW, x,
                      A0, torch.zeros_like(B1), A0, B1, p, gamma, train_A=False, per_client=False)


def test_layer_row_by_hand_ffa():
    # d = 2, r = 1, k = 2; two clients, equal weights, gamma = 2
    A = T([1.0, 0.0])  # (1, 2)
    B1 = torch.stack([T([1.0], [0.0]), T([0.0], [1.0])])  # orthogonal increments
    G = T([1.0, 0.0], [0.0, 3.0])
    x = T([1.0, 1.0])
    row, grams = layer_metrics("l", _ffa_round(B1, A, G, T(0.5, 0.5), 2.0, x))
    # Bbar = (0.5, 0.5)^T; dW = 2 * Bbar A = [[1, 0], [1, 0]]: ||dW|| = sqrt2; dW x = (1, 1): rms 1
    assert row["update_fro"] == pytest.approx(math.sqrt(2))
    assert row["adapter_rms"] == pytest.approx(1.0)
    # dL/dA = 2 Bbar^T G = (1, 3): norm sqrt10;  dL/dB = 2 G A^T = (2, 0): norm 2
    assert row["grad_A_end"] == pytest.approx(math.sqrt(10))
    assert row["grad_B_end"] == pytest.approx(2.0)
    assert row["agg_error"] == pytest.approx(0.0, abs=1e-15)  # A shared: product of averages = average of products
    # orthogonal increments: rho 0; their dL/dA shares (1, 0) and (0, 3) are orthogonal too; outputs (2,0),(0,2)
    assert row["rho_hat"] == pytest.approx(0.0) and row["rho_ratio"] == pytest.approx(0.0)
    assert row["n_eff_ratio"] == pytest.approx(2.0)
    assert row["rho_gA"] == pytest.approx(0.0) and row["rho_out"] == pytest.approx(0.0)
    assert math.isnan(row["rho_gB"])  # A frozen: no A increments
    # same G at start and end: <G, dW> = <G, [[1, 0], [1, 0]]> = 1; the gradient did not move: curvature 0
    assert row["loss_change"] == pytest.approx(1.0) and row["curvature"] == pytest.approx(0.0)


def test_loss_change_and_curvature_by_hand():
    A = T([1.0, 0.0])
    B1 = torch.stack([T([1.0], [0.0]), T([0.0], [1.0])])
    G0 = T([1.0, 0.0], [0.0, 3.0])
    G1 = T([3.0, 0.0], [0.0, 3.0])  # the gradient moved by [[2, 0], [0, 0]]
    row, _ = layer_metrics("l", _ffa_round(B1, A, G1, T(0.5, 0.5), 2.0, T([1.0, 1.0]), G_start=G0))
    # dW = [[1, 0], [1, 0]]: <G0, dW> = 1; <G1 - G0, dW> = 2; ||dW||^2 = 2 -> curvature 1
    assert row["loss_change"] == pytest.approx(1.0)
    assert row["curvature"] == pytest.approx(1.0)


def test_projected_rho_differs_from_frobenius_rho():
    # increments nearly orthogonal overall but sharing the one direction the probe gradient sees
    A = T([1.0, 0.0, 0.0])
    B1 = torch.stack([T([1.0], [5.0], [0.0]), T([1.0], [0.0], [5.0])])
    G = T([1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])  # the loss only cares about output 0
    row, _ = layer_metrics("l", _ffa_round(B1, A, G, T(0.5, 0.5), 1.0, T([1.0, 0.0, 0.0])))
    # Frobenius: Gram [[26, 1], [1, 26]] -> rho 1/26; dL/dA shares are both (1, 0, 0) -> rho 1
    assert row["rho_ratio"] == pytest.approx(1 / 26)
    assert row["rho_gA"] == pytest.approx(1.0)


def test_aggregation_error_of_fedit_by_hand():
    # scalars: B = (1, 3), A = (2, 4): Bbar Abar = 2 * 3 = 6, mean of products (2 + 12) / 2 = 7
    B1, A1 = T(1.0, 3.0).reshape(2, 1, 1), T(2.0, 4.0).reshape(2, 1, 1)
    p = T(0.5, 0.5)
    dW = (p @ B1.reshape(2)) * (p @ A1.reshape(2)) * torch.ones(1, 1, dtype=torch.float64)
    z = torch.zeros(2, 1, 1, dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    m = LayerRound(one, one, one, one, one, one, dW, dW, one, z, z, A1, B1, p, 1.0, True, False)
    row, _ = layer_metrics("l", m)
    assert row["agg_error"] == pytest.approx(1.0)


def test_fedsa_rows_average_each_clients_own_model():
    torch.manual_seed(0)
    K, d, k, r = 3, 4, 5, 2
    tot = torch.randn(K, d, k, dtype=torch.float64)
    rd = torch.randn(K, d, k, dtype=torch.float64)
    x = torch.randn(7, k, dtype=torch.float64)
    p = T(0.2, 0.3, 0.5)
    gA = torch.randn(K, r, k, dtype=torch.float64)
    A0 = torch.randn(K, r, k, dtype=torch.float64)
    B = torch.randn(K, d, r, dtype=torch.float64)
    G = torch.randn(d, k, dtype=torch.float64)
    m = LayerRound(gA, gA, gA, gA, G, G, rd, tot, x, A0, B, A0 + 0.1, B + 0.1, p, 1.0, True, per_client=True)
    row, _ = layer_metrics("l", m)
    assert row["update_fro"] == pytest.approx(float(sum(p[i] * rd[i].norm() ** 2 for i in range(K)).sqrt()))
    assert row["adapter_rms"] == pytest.approx(float(sum(p[i] * (x @ tot[i].T).pow(2).mean() for i in range(K)).sqrt()))
    assert row["grad_A_end"] == pytest.approx(float(sum(p[i] * gA[i].norm() ** 2 for i in range(K)).sqrt()))
    assert row["update_fro"] > float((p @ rd.reshape(K, -1)).norm())  # not the norm of the averaged update
    assert math.isnan(row["agg_error"])


def test_all_row_combines_layers_as_the_concatenation():
    torch.manual_seed(1)
    p = T(0.5, 0.5)
    rows, grams, parts = [], [], []
    for _ in range(2):
        A = torch.randn(2, 3, dtype=torch.float64)
        B1 = torch.randn(2, 4, 2, dtype=torch.float64)
        row, g = layer_metrics("l", _ffa_round(B1, A, torch.randn(4, 3, dtype=torch.float64), p, 1.5,
                                               torch.randn(5, 3, dtype=torch.float64)))
        rows.append(row)
        grams.append(g)
        parts.append(B1.reshape(2, -1))
    allrow = combine_layers(rows, grams, p)
    assert allrow["layer"] == ALL
    assert allrow["update_fro"] == pytest.approx(math.hypot(rows[0]["update_fro"], rows[1]["update_fro"]))
    assert allrow["rho_ratio"] == pytest.approx(ratio_rho(gram(torch.cat(parts, dim=1)), p))
    assert allrow["rho_hat"] == pytest.approx(cosine_rho(gram(torch.cat(parts, dim=1))))
    assert allrow["loss_change"] == pytest.approx(rows[0]["loss_change"] + rows[1]["loss_change"])  # a sum, not a norm
