"""The Wick/Isserlis engine on textbook moments it must reproduce (independent of the LoRA model)."""

from __future__ import annotations

import pytest
import sympy as sp

from sfed_theory.assumptions import SYM, power_sum
from sfed_theory.wick import FIXED_CLIENT, Entry, Idx, IndexFactory, Mat, Term, contract, expect, frobenius_inner


def _entries(field: str, idx: tuple[Idx, ...], n: int, client: Idx | None = None) -> tuple[Entry, ...]:
    return tuple(Entry(field, idx, client) for _ in range(n))


def test_fourth_moment_is_three_sigma4_and_has_three_pairings():
    l, m = Idx("r", 1), Idx("k", 1)
    value, pairings = expect([Term(sp.Integer(1), _entries("A", (l, m), 4))])
    assert len(pairings) == 3
    assert sp.simplify(value - 3 * SYM.r * SYM.k * SYM.s_A**4) == 0


def test_sixth_moment_has_fifteen_pairings_and_odd_moments_vanish():
    l, m = Idx("r", 1), Idx("k", 1)
    value6, pairings6 = expect([Term(sp.Integer(1), _entries("A", (l, m), 6))])
    assert len(pairings6) == 15
    assert sp.simplify(value6 - 15 * SYM.r * SYM.k * SYM.s_A**6) == 0
    value3, pairings3 = expect([Term(sp.Integer(1), _entries("A", (l, m), 3))])
    assert value3 == 0 and pairings3 == []


def test_wishart_second_moment():
    # E tr((A^T A)^2) = s^4 r k (r + k + 1) for A (r x k) with iid N(0, s^2) entries.
    ata = Mat.field("A").T @ Mat.field("A")
    value, _ = expect(frobenius_inner(ata, ata))
    assert sp.simplify(value - SYM.s_A**4 * SYM.r * SYM.k * (SYM.r + SYM.k + 1)) == 0


def test_client_average_variance_is_rho_plus_one_minus_rho_s2():
    bbar = Mat.client_average(lambda i: Mat.field("B", i), "d", "r")
    value, _ = expect(frobenius_inner(bbar, bbar))
    target = SYM.d * SYM.r * SYM.s_B**2 * (SYM.rho + (1 - SYM.rho) * power_sum(2))
    assert sp.simplify(value - target) == 0


def test_contraction_counts_ranges_weights_and_x():
    fac = IndexFactory()
    j1, j2, i1, i2 = fac.fresh("d"), fac.fresh("d"), fac.fresh("N"), fac.fresh("N")
    m1, m2, o = fac.fresh("k"), fac.fresh("k"), fac.fresh("1")
    term = Term(sp.Integer(1), (Entry("x", (m1, o)), Entry("x", (m2, o))), (i1, i2, i1))
    # sum_{j1 j2} delta(j1 j2) = d; p_i1^2 p_i2 with i1 = i2 -> S3; x_m1 x_m2 delta(m1 m2) -> ||x||^2
    term = Term(sp.Integer(1), term.entries + (Entry("g", (j1, o)), Entry("g", (j2, o))), term.weights)
    assert contract(term, [(j1, j2), (i1, i2), (m1, m2)]) == SYM.d * power_sum(3) * SYM.X2
    # without the client delta the weights factorise: S2 * S1 = S2
    assert contract(term, [(j1, j2), (m1, m2)]) == SYM.d * power_sum(2) * SYM.X2


def test_fixed_client_is_not_summed():
    b = Mat.field("B", FIXED_CLIENT)
    value, _ = expect(frobenius_inner(b, b))
    assert sp.simplify(value - SYM.d * SYM.r * SYM.s_B**2) == 0


def test_two_probe_vectors_contract_to_their_inner_products():
    """x and z (the refined regime's two input directions): ||z||^2 = ||x||^2 = X2, x . z = kappa X2. By hand,
    with u_l = a_l . x and v_l = a_l . z jointly Gaussian (variances s^2 X2, covariance s^2 kappa X2):
    E[x^T A^T A z] = r s^2 kappa X2 and E[(x^T A^T A z)^2] = r E[u^2 v^2] + r (r - 1) E[u v]^2
    = s^4 X2^2 r (1 + kappa^2 + r kappa^2)."""
    a, x, z = Mat.field("A"), Mat.vector("x"), Mat.vector("z")
    s2, r, kap, x2 = SYM.s_A**2, SYM.r, SYM.kappa, SYM.X2
    first, _ = expect(frobenius_inner(a @ x, a @ z))
    assert sp.simplify(first - r * s2 * kap * x2) == 0
    zz, _ = expect(frobenius_inner(a @ z, a @ z))
    assert sp.simplify(zz - r * s2 * x2) == 0
    q = (a @ x).T @ (a @ z)  # 1 x 1
    second, _ = expect(frobenius_inner(q, q))
    assert sp.simplify(second - s2**2 * x2**2 * r * (1 + kap**2 + r * kap**2)) == 0
    with pytest.raises(ValueError, match="unknown deterministic vector"):
        Mat.vector("y")


def test_three_probe_vector_factors_in_one_index_class_are_refused():
    m = Idx("k", 1)
    term = Term(sp.Integer(1), (Entry("x", (m, Idx("1", 1))), Entry("z", (m, Idx("1", 2))),
                                Entry("x", (m, Idx("1", 3)))))
    with pytest.raises(NotImplementedError, match="3 deterministic vector factors"):
        contract(term, [])
