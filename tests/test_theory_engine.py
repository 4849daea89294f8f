"""The Wick/Isserlis engine on textbook moments it must reproduce (independent of the LoRA model)."""

from __future__ import annotations

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
