"""Heterogeneous client ranks: the derivation, the solved gamma, and the client_scaling_factors API."""

from __future__ import annotations

import math

import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from sfed_theory import client_scaling_factors, scaling_factor
from sfed_theory.assumptions import SYM
from sfed_theory.derivation import closed_form
from sfed_theory.hetero import (
    C, R_MAX, W, NoClosedForm, at_mix, check_hetero, derive_hetero, equal_ranks, hetero_combinations, mix_value,
    solve_hetero,
)
from sfed_theory.hetero_rules import HETERO_RULES, aggregate_moment

SETTINGS = settings(derandomize=True, max_examples=60, deadline=None)
L = sp.Symbol("l", positive=True, integer=True)

mixes = st.lists(st.integers(1, 9), min_size=1, max_size=6).flatmap(
    lambda ranks: st.tuples(st.just(ranks), st.none() | st.lists(st.floats(0.1, 5.0), min_size=len(ranks),
                                                                   max_size=len(ranks))))


def _p(ranks, weights):
    w = [1.0] * len(ranks) if weights is None else weights
    return [v / sum(w) for v in w]


def test_zero_pad_moment_is_the_issues_sum_over_columns():
    """rho * sum_l P_l^2 + (1 - rho) * sum_i p_i^2 gamma_i^2 r_i comes out of the pairings."""
    got = derive_hetero("adapter_output", "zero-pad", "ffa", "adam").result
    shared = sp.Sum(W(1, 1, 0, L) ** 2, (L, 1, R_MAX))
    expected = C**2 * SYM.d * SYM.s_A**2 * SYM.s_B**2 * SYM.X2 * (SYM.rho * shared + (1 - SYM.rho) * W(2, 2, 1))
    assert sp.expand(got - expected) == 0


@SETTINGS
@given(mixes, st.floats(0.0, 1.0))
def test_derived_sum_evaluates_to_the_hand_sum_over_columns(mix, rho):
    ranks, weights = mix
    p = _p(ranks, weights)
    hand = 0.0
    for j in range(1, max(ranks) + 1):
        big_p = sum(pi for pi, r in zip(p, ranks) if r >= j)
        big_q = sum(pi**2 for pi, r in zip(p, ranks) if r >= j)
        hand += rho * big_p**2 + (1 - rho) * big_q
    expr = derive_hetero("adapter_output", "zero-pad", "ffa", "adam").result
    value = float(at_mix(expr, ranks, weights).subs({C: 1, SYM.d: 1, SYM.s_A: 1, SYM.s_B: 1, SYM.X2: 1, SYM.rho: rho}))
    assert value == pytest.approx(hand, rel=1e-12)
    if rho == 0.0:  # the column sum collapses to sum_i p_i^2 r_i
        assert value == pytest.approx(sum(pi**2 * r for pi, r in zip(p, ranks)), rel=1e-12)


_HOMOGENEOUS = {("zero-pad", "ffa"): "ffa", ("zero-pad", "fedit"): "fedit", ("stack", "ffa"): "ffa",
                ("stack", "fedit"): "exact", ("svd", "ffa"): "ffa", ("svd", "fedit"): "exact"}


@pytest.mark.parametrize("combo", [c for c in hetero_combinations() if c[4] == "shared"], ids=str)
def test_equal_ranks_recover_the_homogeneous_closed_forms(combo):
    quantity, scheme, variant, regime, _ = combo
    het = equal_ranks(derive_hetero(*combo).result).subs(C, SYM.gamma)
    if quantity == "download_gap":  # at equal ranks every client downloads the whole model
        assert het == 0
        return
    hom_q = "adapter_output" if quantity == "download" else quantity
    hom_s = "ffa" if (quantity, variant) == ("aggregation_error", "ffa") else _HOMOGENEOUS[(scheme, variant)]
    assert sp.simplify(sp.expand(het - closed_form(hom_q, hom_s, regime))) == 0


def test_every_combination_derives_with_inspectable_pairings():
    combos = hetero_combinations()
    # 3 quantities x 20 model combinations (zero-pad 4, stack 8, svd 8), loss_change 10 (SGD),
    # download and download_gap 12 each (no closed form under svd)
    assert len(combos) == 94
    allowed = {C, SYM.d, SYM.k, SYM.rho, SYM.s_A, SYM.s_B, SYM.s_dA, SYM.tau, SYM.eta, SYM.X2}
    for combo in combos:
        dv = derive_hetero(*combo)
        assert dv.terms, combo
        if dv.result != 0:
            assert dv.pairings, combo
            plain = dv.result.replace(lambda e: isinstance(e, (sp.Sum, W)), lambda e: sp.Integer(1))
            assert plain.free_symbols - {R_MAX, sp.Symbol("r_c", positive=True, integer=True)} <= allowed, combo
        assert "pairings" in dv.text()


def test_stack_and_svd_are_exact_and_stack_downloads_the_whole_update():
    for scheme in ("stack", "svd"):
        for variant in ("ffa", "fedit"):
            assert derive_hetero("aggregation_error", scheme, variant, "adam").result == 0
    assert derive_hetero("download_gap", "stack", "fedit", "sgd", "independent").result == 0
    assert derive_hetero("aggregation_error", "zero-pad", "ffa", "sgd").result == 0  # A frozen: padding is exact
    assert derive_hetero("aggregation_error", "zero-pad", "fedit", "adam").result != 0


def test_independent_a_inits_remove_the_correlated_part():
    got = derive_hetero("adapter_output", "stack", "ffa", "adam", "independent").result
    assert sp.expand(got - C**2 * SYM.d * SYM.s_A**2 * SYM.s_B**2 * SYM.X2 * W(2, 2, 1)) == 0


def test_svd_download_has_no_closed_form_and_bad_combinations_are_refused():
    with pytest.raises(NoClosedForm, match="Monte Carlo|no closed"):
        derive_hetero("download", "svd", "ffa", "adam")
    with pytest.raises(ValueError, match="shared A init"):
        check_hetero("adapter_output", "zero-pad", "ffa", "adam", "independent")
    with pytest.raises(ValueError, match="sgd"):
        check_hetero("loss_change", "stack", "ffa", "adam", "shared")
    with pytest.raises(ValueError, match="allowed: zero-pad, stack, svd"):
        check_hetero("adapter_output", "hetlora", "ffa", "adam", "shared")


def test_mix_value_evaluates_bands_exactly():
    # ranks (2, 5), weights 1:3, h = (1, 1): sum_l (sum_{r_i >= l} p_i)^2 = 2 * 1^2 + 3 * 0.75^2
    expr = sp.Sum(W(1, 0, 0, L) ** 2, (L, 1, R_MAX))
    assert mix_value(expr, [2, 5], [1, 3], exact=True) == sp.Rational(2) + 3 * sp.Rational(9, 16)
    assert mix_value(W(2, 2, 1), [2, 5], [1, 3], profile=[2, 1]) == pytest.approx(
        (0.25**2) * 4 * 2 + (0.75**2) * 5)


# ---------------------------------------------------------------- the solved invariance


def test_solved_scale_is_the_issues_gamma_star_and_the_profile_is_rslora_per_client():
    inv = solve_hetero("zero-pad", "ffa", "adam")
    assert inv.power == 2 and len(inv.roots) == 2
    assert sp.simplify(inv.profile - 1 / sp.sqrt(SYM.r)) == 0
    rho0 = sp.simplify(inv.c_star.subs(SYM.rho, 0))
    assert sp.simplify(rho0**2 - SYM.alpha**2 / W(2, 2, 1)) == 0


@SETTINGS
@given(mixes, st.floats(1.0, 64.0))
def test_solved_gamma_numbers(mix, alpha):
    ranks, weights = mix
    p = _p(ranks, weights)
    inv = solve_hetero("zero-pad", "ffa", "adam")
    shared = inv.c_value(alpha, ranks, weights, profile=[1.0] * len(ranks), rho=0.0)
    assert shared == pytest.approx(alpha / math.sqrt(sum(pi**2 * r for pi, r in zip(p, ranks))), rel=1e-10)
    # with the derived profile 1/sqrt(r_i): c = alpha / sqrt(S2), i.e. gamma_i = alpha sqrt(N_eff / r_i)
    c = inv.c_value(alpha, ranks, weights, rho=0.0)
    assert c == pytest.approx(alpha / math.sqrt(sum(pi**2 for pi in p)), rel=1e-10)


@pytest.mark.parametrize(("scheme", "variant", "regime"), [("zero-pad", "fedit", "adam"), ("stack", "ffa", "sgd"),
                                                           ("svd", "fedit", "sgd")])
def test_solved_scale_restores_the_reference_at_random_mixes(scheme, variant, regime):
    inv = solve_hetero(scheme, variant, regime)
    numbers = dict(rho=0.3, k=5, s_A=0.7, s_dA=0.4)
    sym = {getattr(SYM, n): v for n, v in numbers.items()}
    for ranks, weights in (([2, 7, 3], [1.0, 2.0, 0.5]), ([1, 1, 6, 6], None), ([4], None)):
        h = [float(inv.profile.subs({SYM.r: r, **sym})) for r in ranks]
        c = inv.c_value(2.0, ranks, weights, profile=h, **numbers)
        moment = at_mix(inv.moment, ranks, weights, h).subs({C: c, **sym})
        ref = inv.reference.subs({SYM.alpha: 2.0, **sym})
        assert float(moment / ref) == pytest.approx(1.0, rel=1e-9)


# ---------------------------------------------------------------- client_scaling_factors


@SETTINGS
@given(mixes, st.floats(0.0, 1.0), st.sampled_from([("zero-pad", False, "shared"), ("zero-pad", True, "shared"),
                                                    ("stack", False, "independent"), ("svd", True, "shared")]))
def test_api_equals_the_derivation(mix, rho, model):
    ranks, weights = mix
    scheme, train_a, a_init = model
    variant = "fedit" if train_a else "ffa"
    inv = solve_hetero(scheme, variant, "adam", a_init)
    numbers = dict(rho=rho, s_A=1.0, s_dA=0.0)  # A's in-round change neglected against its init
    for rule, profile in (("sfed-hetero", [r**-0.5 for r in ranks]), ("sfed-hetero-shared", [1.0] * len(ranks))):
        s = client_scaling_factors(rule, 16.0, ranks, scheme=scheme, weights=weights, rho=rho, train_a=train_a,
                                   a_init=a_init)
        c = inv.c_value(16.0, ranks, weights, profile=profile, **numbers)
        assert list(s.clients) == pytest.approx([c * h for h in profile], rel=1e-9)
        assert s.size == pytest.approx(1.0, rel=1e-9)
    gammas = [0.5 + r / 3 for r in ranks]
    direct = at_mix(inv.moment, ranks, weights, gammas).subs(
        {C: 1, SYM.d: 1, SYM.X2: 1, SYM.s_B: 1, **{getattr(SYM, n): v for n, v in numbers.items()}})
    assert aggregate_moment(ranks, gammas, weights, rho, train_a=train_a, a_init=a_init, scheme=scheme) == \
        pytest.approx(float(direct), rel=1e-9)


@SETTINGS
@given(st.integers(1, 512), st.integers(1, 32), st.floats(0.1, 100.0), st.sampled_from(["zero-pad", "stack", "svd"]))
def test_equal_ranks_give_the_homogeneous_rules(r, n, alpha, scheme):
    for rule in HETERO_RULES:
        s = client_scaling_factors(rule, alpha, [r] * n, scheme=scheme)
        assert s.rescale == pytest.approx([1.0] * n)
        if rule in ("sfed", "sfed-general", "sfed-hetero"):
            assert [s.server, *s.clients] == pytest.approx([scaling_factor("sfed", alpha, r, n)] * (n + 1), rel=1e-12)
        if rule == "sfed-hetero-shared":
            assert s.server == pytest.approx(scaling_factor("sfed", alpha, r, n), rel=1e-12)
        if rule in ("lora", "rslora"):
            assert s.server == pytest.approx(scaling_factor(rule, alpha, r, n))


@SETTINGS
@given(mixes, st.floats(0.0, 1.0))
def test_rescale_is_server_over_client_and_sfed_hetero_is_sfed_general_per_client_at_rho0(mix, rho):
    ranks, weights = mix
    s = client_scaling_factors("sfed-hetero", 8.0, ranks, weights=weights, rho=rho)
    assert [g * f for g, f in zip(s.clients, s.rescale)] == pytest.approx([s.server] * len(ranks), rel=1e-12)
    if rho == 0.0:
        expect = [scaling_factor("sfed-general", 8.0, r, len(ranks), weights=weights) for r in ranks]
        assert list(s.clients) == pytest.approx(expect, rel=1e-10)
    same = client_scaling_factors("sfed-general", 8.0, [ranks[0]] * len(ranks), weights=weights, rho=rho)
    derived = client_scaling_factors("sfed-hetero", 8.0, [ranks[0]] * len(ranks), weights=weights, rho=rho)
    assert derived.clients == pytest.approx(same.clients, rel=1e-10)


def test_lora_server_convention_and_the_sizes_of_the_aggregate():
    """The issue's complaint in numbers: lora scales the server by alpha / R, clients by alpha / r_i."""
    s = client_scaling_factors("lora", 16.0, [4, 16, 64])
    assert s.server == pytest.approx(0.25) and s.clients == pytest.approx((4.0, 1.0, 0.25))
    assert s.rescale == pytest.approx((1 / 16, 1 / 4, 1.0))
    mix = [4, 16, 64] * 4
    sizes = {rule: client_scaling_factors(rule, 16.0, mix).size for rule in HETERO_RULES}
    assert sizes["sfed-hetero"] == pytest.approx(1.0) and sizes["sfed-hetero-shared"] == pytest.approx(1.0)
    assert sizes["lora"] < sizes["rslora"] < 1.0
    assert sizes["sfed"] == pytest.approx(1.0)  # rho = 0, equal weights: sfed at each client's rank is exact
    correlated = {rule: client_scaling_factors(rule, 16.0, mix, rho=0.3).size for rule in HETERO_RULES}
    assert correlated["sfed"] > 1.0 and correlated["sfed-hetero"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ranks=[]), "at least one client rank"),
        (dict(ranks=[4, 0]), "integer >= 1"),
        (dict(ranks=[4, 2.5]), "integer >= 1"),
        (dict(ranks=[True, 4]), "integer >= 1"),
        (dict(ranks=4), "sequence of client ranks"),
        (dict(ranks=[4, 16], weights=[1.0]), "weights has 1 entries but ranks has 2"),
        (dict(ranks=[4, 16], weights=[1.0, -1.0]), "non-negative"),
        (dict(ranks=[4], rule="fedavg"), "allowed rules: lora, rslora"),
        (dict(ranks=[4], scheme="hetlora"), "allowed schemes: zero-pad, stack, svd"),
        (dict(ranks=[4], rho=1.5), r"\[0, 1\]"),
        (dict(ranks=[4], alpha=0.0), "> 0"),
        (dict(ranks=[4], a_init="independent"), "shared A"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, match):
    args = dict(rule="sfed", alpha=16.0) | kwargs
    with pytest.raises(ValueError, match=match):
        client_scaling_factors(args.pop("rule"), args.pop("alpha"), args.pop("ranks"), **args)


# ---------------------------------------------------------------- the command line


def _rows(out: str) -> dict[str, list[float]]:
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("#")]
    return {ln.split()[0]: [float(v) for v in ln.split()[1:]] for ln in lines[1:]}


def test_table_with_ranks_prints_server_client_gammas_rescale_and_size(capsys):
    from sfed_theory.cli import main

    assert main(["table", "--alpha", "16", "--ranks", "4", "16", "64", "--rho", "0.1", "--weights", "1,2,3"]) == 0
    out = capsys.readouterr().out
    assert "gamma[4]" in out and "rescale[64]" in out
    rows = _rows(out)
    assert set(rows) == set(HETERO_RULES)
    for rule, cells in rows.items():
        s = client_scaling_factors(rule, 16.0, [4, 16, 64], weights=[1, 2, 3], rho=0.1)
        assert cells == pytest.approx([s.server, s.size, *s.clients, *s.rescale], rel=1e-4)
    assert main(["table", "--alpha", "16", "--ranks", "64", "64", "64", "64"]) == 0
    sfed = _rows(capsys.readouterr().out)["sfed-hetero"]
    assert sfed[:1] + sfed[2:6] == pytest.approx([scaling_factor("sfed", 16, 64, 4)] * 5, rel=1e-4)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--ranks", "4", "0"], "integer >= 1"),
        (["--ranks", "4", "16", "--rank", "4"], "not both"),
        (["--ranks", "4", "16", "--clients", "3"], "disagrees"),
        (["--ranks", "4", "16", "--weights", "1,2,3"], "weights has 3 entries but ranks has 2"),
        (["--ranks", "4", "16", "--participating", "1"], "participating"),
        (["--ranks", "4", "--a-init", "independent"], "shared A"),
        (["--rank", "4"], "--rank and --clients"),
    ],
)
def test_table_with_bad_ranks_exits_2_with_a_clear_message(argv, match, capsys):
    from sfed_theory.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["table", "--alpha", "16", *argv])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_hetero_command_prints_the_derivation_and_the_solved_scale(capsys):
    from sfed_theory.cli import main

    assert main(["hetero", "--scheme", "zero-pad", "--variant", "ffa", "--regime", "adam", "--steps", "--solve"]) == 0
    out = capsys.readouterr().out
    assert "pairing[0]: <B[i_{1}] B[i_{2}]> <A A>" in out and "Sum(W(1, 1, 0, l)**2, (l, 1, R))" in out
    assert "h(r) = 1/sqrt(r)" in out and "c* = alpha*sqrt(1/(" in out
    assert main(["hetero", "--quantity", "download"]) == 0
    assert "no closed form" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["hetero", "--quantity", "loss_change", "--regime", "adam", "--scheme", "stack", "--variant", "ffa"])


def test_mix_ranks_and_size_exponents_in_n():
    from sfed_theory.hetero_rules import mix_ranks, size_exponent

    assert mix_ranks((4, 16, 64), 5) == (4, 16, 64, 4, 16)
    ns = (3, 6, 12, 24, 48)
    # at rho = 0 the aggregate of fixed-per-client gammas shrinks like N^(-1/2); sfed and the derived rules hold it
    assert size_exponent("rslora", 16, (4, 16, 64), ns) == pytest.approx(-0.5, abs=0.02)
    assert size_exponent("lora", 16, (4, 16, 64), ns) == pytest.approx(-0.5, abs=0.02)
    assert size_exponent("sfed-hetero", 16, (4, 16, 64), ns, rho=0.2) == pytest.approx(0.0, abs=1e-9)
    assert size_exponent("sfed", 16, (4, 16, 64), ns, rho=0.2) > 0.3  # sqrt(N) undoes an average that rho stops
    with pytest.raises(ValueError, match="two distinct"):
        size_exponent("sfed", 16, (4,), (3, 3))
    with pytest.raises(ValueError, match="integer >= 1"):
        mix_ranks((4, 16), 0)
