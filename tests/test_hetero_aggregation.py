"""validation.hetero_ranks: aggregation of adapters of different ranks, against hand computations."""

from __future__ import annotations

import pytest
import torch

from sfed_theory.hetero_rules import client_scaling_factors
from validation.hetero_ranks import (
    download_zero_pad, exact_sum, move_b, normalised_weights, pad_a, pad_b, stack, svd_redistribute, zero_pad_a,
    zero_pad_b,
)

T = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731

# client 1: rank 1, client 2: rank 2; d = 2, k = 3; weights 1:3; gammas 2 and 1; server gamma 0.5
B1, A1 = T([[1.0], [2.0]]), T([[1.0, 0.0, 1.0]])
B2, A2 = T([[1.0, 0.0], [0.0, 1.0]]), T([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
P, G, GS = (1.0, 3.0), (2.0, 1.0), 0.5


def test_move_b_preserves_the_function():
    b = T([[1.0, -2.0], [0.5, 3.0]])
    moved = move_b(b, 2.0, 0.5)
    assert torch.equal(moved, 4.0 * b)
    assert torch.allclose(0.5 * moved, 2.0 * b)
    assert torch.allclose(move_b(moved, 0.5, 2.0), b)  # the round trip restores B


def test_padding_appends_zeros():
    assert torch.equal(pad_b(B1, 3), T([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))
    assert torch.equal(pad_a(A1, 2), T([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="smaller width"):
        pad_b(B2, 1)


def test_zero_pad_b_by_hand_with_unequal_weights_and_gammas():
    # moved: B1 * 2/0.5 = [[4], [8]] padded to [[4, 0], [8, 0]]; B2 * 1/0.5 = [[2, 0], [0, 2]]
    # 0.25 * [[4, 0], [8, 0]] + 0.75 * [[2, 0], [0, 2]] = [[2.5, 0], [2, 1.5]]
    assert torch.allclose(zero_pad_b([B1, B2], P, G, GS), T([[2.5, 0.0], [2.0, 1.5]]))


def test_zero_pad_a_by_hand_shrinks_rows_few_clients_hold():
    # 0.25 * [[1, 0, 1], [0, 0, 0]] + 0.75 * A2: row 2 is held only by client 2 (weight 0.75)
    assert torch.allclose(zero_pad_a([A1, A2], P), T([[0.25, 0.75, 0.25], [0.75, 0.75, 0.75]]))


def test_exact_sum_and_stack_by_hand():
    # 0.25 * 2 * B1 A1 + 0.75 * 1 * B2 A2
    expected = T([[0.5, 0.75, 0.5], [1.75, 0.75, 1.75]])
    assert torch.allclose(exact_sum([B1, B2], [A1, A2], P, G), expected)
    b, a = stack([B1, B2], [A1, A2], P, G, GS)
    # blocks p_i g_i / g_s B_i: 0.25 * 4 * B1 = [[1], [2]] and 0.75 * 2 * B2 = [[1.5, 0], [0, 1.5]]
    assert torch.allclose(b, T([[1.0, 1.5, 0.0], [2.0, 0.0, 1.5]]))
    assert torch.equal(a, torch.cat([A1, A2]))
    assert torch.allclose(GS * b @ a, expected)


def test_zero_pad_with_shared_frozen_a_equals_the_exact_sum():
    a_shared = T([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # client 1 holds row 1, client 2 both
    b_server = zero_pad_b([B1, B2], P, G, GS)
    assert torch.allclose(GS * b_server @ a_shared, exact_sum([B1, B2], [a_shared[:1], a_shared], P, G))


def test_download_is_the_server_model_on_the_clients_columns():
    a_server = T([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    b_server = zero_pad_b([B1, B2], P, G, GS)  # [[2.5, 0], [2, 1.5]]
    b, a = download_zero_pad(b_server, a_server, 1, GS, G[0])
    assert torch.allclose(b, T([[0.625], [0.5]]))  # [[2.5], [2]] * 0.5 / 2
    assert torch.equal(a, a_server[:1])
    assert torch.allclose(G[0] * b @ a, GS * b_server[:, :1] @ a_server[:1])
    b, a = download_zero_pad(b_server, a_server, 2, GS, G[1])  # the full-rank client gets the whole model
    assert torch.allclose(G[1] * b @ a, GS * b_server @ a_server)
    with pytest.raises(ValueError, match="1..2"):
        download_zero_pad(b_server, a_server, 3, GS, 1.0)


def test_svd_redistribution_by_hand():
    delta = T([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b, a = svd_redistribute(delta, 1, gamma=2.0)
    assert b.shape == (2, 1) and a.shape == (1, 3)
    assert torch.allclose(2.0 * b @ a, T([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))  # the best rank-1 part
    b, a = svd_redistribute(delta, 4, gamma=0.5)  # rank above min(d, k): exact, padded to the adapter's rank
    assert b.shape == (2, 4) and a.shape == (4, 3)
    assert torch.allclose(0.5 * b @ a, delta)


def test_svd_truncation_error_is_the_dropped_singular_values():
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    delta = exact_sum([rand(5, 2), rand(5, 4)], [rand(2, 6), rand(4, 6)], (2.0, 1.0), (1.0, 0.7))
    b, a = svd_redistribute(delta, 2, gamma=1.3)
    err = torch.linalg.matrix_norm(delta - 1.3 * b @ a)
    s = torch.linalg.svdvals(delta)
    assert err == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-10)  # Eckart-Young


def test_rescale_of_the_api_is_the_function_preserving_move():
    s = client_scaling_factors("sfed", 16.0, [1, 2], weights=P)
    b_server = zero_pad_b([B1, B2], P, s.clients, s.server)
    for i, r in enumerate((1, 2)):
        b, _ = download_zero_pad(b_server, torch.eye(2, 3, dtype=torch.float64), r, s.server, s.clients[i])
        assert torch.allclose(b, s.rescale[i] * b_server[:, :r])
        # what client i downloads, uploaded again unchanged, is what the server holds
        assert torch.allclose(zero_pad_b([b], None, [s.clients[i]], s.server), b_server[:, :r])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: zero_pad_b([], None, [], 1.0), "at least one"),
        (lambda: zero_pad_b([B1, B2], (1.0,), G, GS), "weights has 1"),
        (lambda: zero_pad_b([B1, B2], P, (1.0,), GS), "gammas has 1"),
        (lambda: exact_sum([B1, B2], [A2, A1], P, G), "disagree on its rank"),
        (lambda: normalised_weights((1.0, -1.0), 2), "non-negative"),
        (lambda: move_b(B1, 0.0, 1.0), "> 0"),
        (lambda: svd_redistribute(T([[1.0]]), 0, 1.0), ">= 1"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
