"""Heterogeneous client ranks: derived moments and the solved scaling under three aggregation schemes.

Clients train different LoRA ranks ``r_i``; the server works at the largest rank ``R = max r_i``.
The derivation uses the engine of :mod:`sfed_theory.wick` unchanged (fresh-index ``Mat`` builders,
``client_average``, Wick pairings in ``expect``) and adds two *deterministic* client factors:

* a column mask ``m_{i l} = [l <= r_i]``: client i's B (d x r_i) is the full-width field times its
  mask, its A (r_i x k) the full-height A times its mask, so padding is multiplication by ``m``;
* a client scale ``gamma_i = c * h_i``: a common factor ``c`` times a per-client profile ``h_i``.

Masks couple the client index with the rank index, so the delta contraction no longer factorises
into a product over index classes: :func:`contract_hetero` builds the bipartite graph of client
classes and rank classes joined by masks, folds a rank class that only one client class sees into
a power of that client's rank (``sum_l [l <= r_i] = r_i``), and writes what remains as

    ``W(a, b, q, l1, ...) = sum over clients i with r_i >= l1, ... of p_i^a h_i^b r_i^q``

inside ``Sum(..., (l, 1, R))`` over the rank classes several client classes share. These *mix sums*
are then evaluated for a given rank mix, weights and profile (:func:`mix_value`). Nothing about the
answer is typed in: e.g. the issue's ``sum_j rho P_j^2 + (1 - rho) Q_j`` appears as
``rho*Sum(W(1, 1, 0, l)**2, (l, 1, R)) + (1 - rho)*W(2, 2, 1)`` because the pairings produce it.

The random model (stated per scheme in :data:`SCHEME_TEXT`): the canonical one-round model of
:mod:`sfed_theory.assumptions` (A init iid N(0, s_A^2); B increments N(0, s_B^2) with client
correlation rho under Adam, ``B_i = -gamma_i eta G_i A_i^T`` under SGD; A increments ``Delta_i``
under Adam when A trains), every client moves its factors to the server *function-preservingly*
(client i's contribution to the server model is ``gamma_i B_i A_i``, whatever gamma the server
stores B with), and a client holds the leading ``r_i`` rows of A (nested, as zero-padding and
SVD redistribution both give). ``a_init="independent"`` gives each client its own A init instead
(FLoRA re-initialises the clients' adapters), which only makes sense for the exact-sum schemes.

Truncated SVD (FlexLoRA) has no closed form for what a client downloads (the top ``r_c`` singular
values of a random matrix); :func:`check_hetero` says so and
:mod:`sfed_theory.hetero_montecarlo` simulates it. The server's aggregate under SVD is the exact
sum, derived like stacking.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

from sfed_theory.assumptions import FIELDS, SYM, GaussianField, power_sum
from sfed_theory.wick import (
    FIXED_CLIENT, Entry, Idx, IndexFactory, Mat, Pairing, Term, expect, frobenius_inner, term_latex,
)

__all__ = [
    "R_MAX", "C", "R_C", "W", "HETERO_FIELDS", "SCHEME_TEXT", "VARIANTS", "REGIMES_H", "A_INITS",
    "QUANTITY_TEXT_H", "QUANTITIES_H", "NoClosedForm", "check_hetero", "hetero_combinations", "build_hetero",
    "contract_hetero", "HeteroDerivation", "derive_hetero", "mix_value", "at_mix", "equal_ranks",
    "HeteroInvariance", "local_profile", "solve_hetero",
]

R_MAX = sp.Symbol("R", positive=True, integer=True)
"""The largest client rank (the server's padded width)."""
C = sp.Symbol("c", positive=True)
"""Common scale: client i trains (and uploads) with ``gamma_i = c * h_i``."""
R_C = sp.Symbol("r_c", positive=True, integer=True)
"""Rank of the fixed client c that downloads the server model."""
W = sp.Function("W")
"""``W(a, b, q, *ls) = sum_{i: r_i >= every l} p_i^a h_i^b r_i^q`` (a mix sum)."""

HETERO_FIELDS: dict[str, GaussianField] = {
    **FIELDS,
    "A0": GaussianField(
        "A0", "A^{0}", ("r", "k"), SYM.s_A**2, True,
        "client i's own A init (R x k, the leading r_i rows used), iid N(0, s_A^2), independent across clients",
        correlation=sp.Integer(0),
    ),
}
"""The canonical fields plus the per-client A init of ``a_init='independent'``."""

SCHEME_TEXT: dict[str, str] = {
    "zero-pad": "HetLoRA: pad every client's B (d x r_i) with zero columns and A (r_i x k) with zero rows to "
                "width R = max r_i, then average; A frozen ('ffa': the server keeps the shared A) or averaged "
                "with its padding ('fedit': rows held by few clients shrink by P_l = sum_{r_i >= l} p_i). "
                "Client c downloads the leading r_c columns of B and rows of A",
    "stack": "FLoRA: stack the clients' factors, B = [p_1 g_1 B_1 ... p_N g_N B_N], A = [A_1; ...; A_N], "
             "an exact sum of products sum_i p_i gamma_i B_i A_i, merged into the frozen weight: every client "
             "downloads the whole update",
    "svd": "FlexLoRA: the server forms the full update sum_i p_i gamma_i B_i A_i (the exact sum, as stacking) "
           "and client c downloads its best rank-r_c approximation (truncated SVD); that download has no "
           "closed form (Monte Carlo)",
}
VARIANTS: tuple[str, ...] = ("ffa", "fedit")
"""'ffa': A frozen during the round; 'fedit': A trains (Adam: ``A_i = A + Delta_i``) and is aggregated."""
REGIMES_H: tuple[str, ...] = ("adam", "sgd")
A_INITS: tuple[str, ...] = ("shared", "independent")

QUANTITY_TEXT_H: dict[str, str] = {
    "adapter_output": "E||dW x||^2 (the server's aggregated update on a probe input x)",
    "update_fro": "E||dW||_F^2 (the server's aggregated update)",
    "aggregation_error": "E||dW - sum_i p_i gamma_i B_i A_i||_F^2 (against the exact sum of products)",
    "loss_change": "E<sum_i p_i G_i, dW> (first-order loss change; SGD only)",
    "download": "E||dW_c x||^2, dW_c the update the fixed client c (rank r_c) downloads",
    "download_gap": "E||(dW - dW_c) x||^2 (what client c's model misses of the server's)",
}
QUANTITIES_H: tuple[str, ...] = tuple(QUANTITY_TEXT_H)


class NoClosedForm(ValueError):
    """The quantity is defined but has no closed form under this scheme (use Monte Carlo)."""


def check_hetero(quantity: str, scheme: str, variant: str, regime: str, a_init: str) -> None:
    """Raise ValueError unless the combination is defined (NoClosedForm for SVD downloads)."""
    for name, value, allowed in (("quantity", quantity, QUANTITIES_H), ("scheme", scheme, tuple(SCHEME_TEXT)),
                                 ("variant", variant, VARIANTS), ("regime", regime, REGIMES_H),
                                 ("a_init", a_init, A_INITS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    if scheme == "zero-pad" and a_init != "shared":
        raise ValueError("zero-padding averages the clients' factors position by position, which needs one "
                         "shared A init (a_init='shared'); independent inits are for 'stack' and 'svd'")
    if quantity == "loss_change" and regime != "sgd":
        raise ValueError("loss_change is defined in the 'sgd' regime only (under 'adam' the increments are "
                         "independent of the gradient, so E<G, dW> = 0 by assumption)")
    if scheme == "svd" and quantity in ("download", "download_gap"):
        raise NoClosedForm(f"{quantity} under 'svd' is the top-r_c singular part of a random matrix: no closed "
                           "form; use sfed_theory.hetero_montecarlo.simulate_hetero")


def hetero_combinations() -> list[tuple[str, str, str, str, str]]:
    """Every (quantity, scheme, variant, regime, a_init) with a closed form."""
    out = []
    for combo in itertools.product(QUANTITIES_H, SCHEME_TEXT, VARIANTS, REGIMES_H, A_INITS):
        try:
            check_hetero(*combo)
        except ValueError:
            continue
        out.append(combo)
    return out


# ---------------------------------------------------------------- the random quantities as index expressions


def _field(name: str, client: Idx | None = None) -> Mat:
    f = HETERO_FIELDS[name]
    if f.per_client != (client is not None):
        raise ValueError(f"field {name!r} per_client={f.per_client} but client={client}")
    return Mat(f.shape[0], f.shape[1], lambda fac, a, b: [Term(sp.Integer(1), (Entry(name, (a, b), client),))])


def _masked(m: Mat, client: Idx, side: str) -> Mat:
    """``m`` with its rank-side index masked by client's ``[l <= r_client]`` (zero-padding)."""

    def build(fac: IndexFactory, a: Idx, b: Idx) -> list[Term]:
        mask = Term(sp.Integer(1), (Entry("m", (b if side == "cols" else a,), client),))
        return [t * mask for t in m.build(fac, a, b)]

    return Mat(m.rows, m.cols, build)


def _scaled_by_gamma(m: Mat, client: Idx) -> Mat:
    """``gamma_client * m`` with ``gamma_i = c * h_i``."""
    factor = Term(C, (Entry("h", (), client),))
    return Mat(m.rows, m.cols, lambda fac, a, b: [t * factor for t in m.build(fac, a, b)])


def _a_init(a_init: str, i: Idx) -> Mat:
    return _field("A") if a_init == "shared" else _field("A0", i)


def client_A(variant: str, regime: str, a_init: str, i: Idx) -> Mat:
    """Client i's A after the round, zero-padded to R rows (only the leading r_i rows are nonzero)."""
    a = _a_init(a_init, i)
    if variant == "fedit" and regime == "adam":  # one SGD step from B = 0 leaves A unchanged
        a = a + _field("D", i)
    return _masked(a, i, "rows")


def client_B(regime: str, a_init: str, i: Idx) -> Mat:
    """Client i's B after the round (from 0), zero-padded to R columns."""
    if regime == "adam":
        return _masked(_field("B", i), i, "cols")
    # SGD: dL_i/dB = gamma_i G_i A_i^T with A_i the client's (masked) rows
    a_i = _masked(_a_init(a_init, i), i, "rows")
    return _scaled_by_gamma(_field("G", i) @ a_i.T, i).scale(-SYM.eta)


def _upload(regime: str, a_init: str, i: Idx) -> Mat:
    """What client i's B contributes in the server's function space: ``gamma_i B_i``."""
    return _scaled_by_gamma(client_B(regime, a_init, i), i)


def _exact(variant: str, regime: str, a_init: str) -> Mat:
    return Mat.client_average(lambda i: _upload(regime, a_init, i) @ client_A(variant, regime, a_init, i), "d", "k")


def _zero_pad_factors(variant: str, regime: str) -> tuple[Mat, Mat]:
    b = Mat.client_average(lambda i: _upload(regime, "shared", i), "d", "r")
    if variant == "ffa":
        return b, _field("A")
    return b, Mat.client_average(lambda i: client_A(variant, regime, "shared", i), "r", "k")


def update(scheme: str, variant: str, regime: str, a_init: str) -> Mat:
    """The server's update dW in function space (every client's gamma_i included)."""
    if scheme == "zero-pad":
        b, a = _zero_pad_factors(variant, regime)
        return b @ a
    return _exact(variant, regime, a_init)


def download(scheme: str, variant: str, regime: str, a_init: str) -> Mat:
    """The update the fixed client c holds after downloading (closed-form schemes only)."""
    if scheme == "zero-pad":  # leading r_c columns of B (rescaled by gamma_s / gamma_c) and rows of A
        b, a = _zero_pad_factors(variant, regime)
        return _masked(b, FIXED_CLIENT, "cols") @ a
    if scheme == "stack":  # FLoRA merges the stacked product into the frozen weight
        return update(scheme, variant, regime, a_init)
    raise NoClosedForm("the SVD download has no closed form")


def build_hetero(quantity: str, scheme: str, variant: str, regime: str, a_init: str) -> list[Term]:
    """The scalar random quantity (before expectation) as a list of index terms."""
    check_hetero(quantity, scheme, variant, regime, a_init)
    fac = IndexFactory()
    x = Mat.vector_x()
    dw = update(scheme, variant, regime, a_init)
    if quantity == "adapter_output":
        return frobenius_inner(dw @ x, dw @ x, fac)
    if quantity == "update_fro":
        return frobenius_inner(dw, dw, fac)
    if quantity == "aggregation_error":
        err = dw - _exact(variant, regime, a_init)
        return frobenius_inner(err, err, fac)
    if quantity == "loss_change":
        return frobenius_inner(Mat.client_average(lambda i: _field("G", i), "d", "k"), dw, fac)
    dwc = download(scheme, variant, regime, a_init)
    if quantity == "download":
        return frobenius_inner(dwc @ x, dwc @ x, fac)
    gap = (dw - dwc) @ x
    return frobenius_inner(gap, gap, fac)


# ---------------------------------------------------------------- contraction with masks


def _find(parent: dict[Idx, Idx], a: Idx) -> Idx:
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


@dataclass
class _ClientNode:
    a: int = 0  # weights p
    b: int = 0  # profile factors h
    q: int = 0  # folded rank classes (powers of r_i)
    fixed: bool = False


def _rank_symbol(n: int, total: int) -> sp.Symbol:
    return sp.Symbol("l" if total == 1 else f"l{n + 1}", positive=True, integer=True)


def _component_value(clients: dict[Idx, _ClientNode], ranks: dict[Idx, set[Idx]]) -> sp.Expr:
    """Sum over one connected component of client and rank classes (masks as edges)."""
    ranks = {l: set(cs) for l, cs in ranks.items()}
    value: sp.Expr = sp.Integer(1)
    for l in [l for l, cs in ranks.items() if len(cs) == 1]:  # a rank class only one client class sees
        (ci,) = ranks.pop(l)
        if clients[ci].fixed:
            value *= R_C
        else:
            clients[ci].q += 1

    def signature(l: Idx) -> tuple:
        return tuple(sorted((clients[ci].fixed, clients[ci].a, clients[ci].b, clients[ci].q,
                             sum(ci in cs for cs in ranks.values())) for ci in ranks[l]))

    order = sorted(ranks, key=signature)
    names = {l: _rank_symbol(n, len(order)) for n, l in enumerate(order)}
    body: sp.Expr = sp.Integer(1)
    for ci, node in clients.items():
        ls = sorted((names[l] for l, cs in ranks.items() if ci in cs), key=str)
        if node.fixed:
            body *= sp.Symbol("p_c", positive=True) ** node.a * sp.Symbol("h_c", positive=True) ** node.b \
                * R_C ** node.q
        elif not ls and (node.a, node.b, node.q) == (1, 0, 0):
            continue  # the weights sum to one
        else:
            body *= W(node.a, node.b, node.q, *ls)
    if not order:
        return value * body
    limits = [(names[l], 1, R_C if any(clients[ci].fixed for ci in ranks[l]) else R_MAX) for l in order]
    return value * sp.Sum(body, *limits)


def contract_hetero(term: Term, deltas: Sequence[tuple[Idx, Idx]]) -> sp.Expr:
    """Sum ``prod(deltas) * weights * masks * profiles * x-factors`` of ``term`` over all its indices.

    Like :func:`sfed_theory.wick.contract` for the dimension classes (d, k and the probe's x); client
    and rank classes joined by masks are summed together (see the module docstring).
    """
    indices: set[Idx] = set(term.weights)
    for e in term.entries:
        indices.update(e.idx)
        if e.client is not None:
            indices.add(e.client)
    parent = {i: i for i in indices}
    for a, b in deltas:
        if a.rng != b.rng:
            raise ValueError(f"delta between ranges {a.rng} and {b.rng}")
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:
            parent[ra] = rb
    roots = {_find(parent, i) for i in indices}
    clients = {r: _ClientNode(fixed=any(i.fixed for i in indices if _find(parent, i) == r))
               for r in roots if r.rng == "N"}
    ranks: dict[Idx, set[Idx]] = {r: set() for r in roots if r.rng == "r"}
    x_count: dict[Idx, int] = {}
    for i in term.weights:
        clients[_find(parent, i)].a += 1
    for e in term.entries:
        if e.field == "x":
            root = _find(parent, e.idx[0])
            x_count[root] = x_count.get(root, 0) + 1
        elif e.field == "h":
            clients[_find(parent, e.client)].b += 1
        elif e.field == "m":
            ranks[_find(parent, e.idx[0])].add(_find(parent, e.client))
    value: sp.Expr = sp.Integer(1)
    for root in roots:
        if root.rng in ("N", "r"):
            continue
        nx = x_count.get(root, 0)
        if nx == 0:
            value *= {"d": SYM.d, "k": SYM.k, "1": sp.Integer(1)}[root.rng]
        elif nx == 2:
            value *= SYM.X2
        else:
            raise NotImplementedError(f"an index class carrying {nx} factors of x (only ||x||^2 is modelled)")
    for l in [l for l, cs in ranks.items() if not cs]:  # unmasked rank class: the server's full width
        value *= R_MAX
        del ranks[l]
    seen: set[Idx] = set()
    for start in clients:
        if start in seen:
            continue
        comp_c, comp_r, todo = {start}, set(), [start]
        while todo:
            ci = todo.pop()
            for l, cs in ranks.items():
                if ci in cs and l not in comp_r:
                    comp_r.add(l)
                    new = cs - comp_c
                    comp_c |= new
                    todo.extend(new)
        seen |= comp_c
        value *= _component_value({ci: clients[ci] for ci in comp_c}, {l: ranks[l] for l in comp_r})
    return value


# ---------------------------------------------------------------- derivation


@dataclass(frozen=True)
class HeteroDerivation:
    """Every step of one heterogeneous-rank derivation."""

    quantity: str
    scheme: str
    variant: str
    regime: str
    a_init: str
    terms: tuple[Term, ...]
    pairings: tuple[Pairing, ...]
    result: sp.Expr  # E[quantity] in c, the model symbols and the mix sums W

    def text(self, steps: bool = False) -> str:
        """The combination, the counts and the closed form; with ``steps`` every index term and pairing."""
        lines = [f"{self.quantity} [{self.scheme}/{self.variant}/{self.regime}/A {self.a_init}]: "
                 f"{len(self.terms)} index terms, {len(self.pairings)} pairings"]
        if steps:
            lines += [f"  term: {term_latex(t)}" for t in self.terms]
            lines += [f"  pairing[{p.term}]: {p.text()}" for p in self.pairings]
        lines.append(f"  E = {self.result}")
        return "\n".join(lines)


@lru_cache(maxsize=None)
def derive_hetero(quantity: str, scheme: str = "zero-pad", variant: str = "ffa", regime: str = "adam",
                  a_init: str = "shared") -> HeteroDerivation:
    """Derive ``E[quantity]`` for heterogeneous ranks by Wick pairings and masked contraction (cached)."""
    terms = build_hetero(quantity, scheme, variant, regime, a_init)
    total, pairings = expect(terms, fields=HETERO_FIELDS, contract_fn=contract_hetero)
    return HeteroDerivation(quantity, scheme, variant, regime, a_init, tuple(terms), tuple(pairings),
                            sp.factor(sp.expand(total)))


# ---------------------------------------------------------------- evaluating the mix sums


def _bands(ranks: Sequence[int], upper: int) -> list[tuple[int, int]]:
    """``(representative, width)`` of the rank bands in ``1..upper``; in a band the set
    ``{i: r_i >= l}`` does not change, so every l in it acts like its top end."""
    cuts = sorted({r for r in ranks if r <= upper} | {upper})
    out, prev = [], 0
    for c in cuts:
        out.append((c, c - prev))
        prev = c
    return out


def _num(expr: sp.Expr, env: dict, mix: tuple) -> object:
    ranks, p, h, exact = mix
    if expr in env:
        return env[expr]
    if isinstance(expr, sp.Number):
        return expr if exact else float(expr)
    if isinstance(expr, sp.Add):
        return sum((_num(a, env, mix) for a in expr.args), start=0)
    if isinstance(expr, sp.Mul):
        out = 1
        for a in expr.args:
            out = out * _num(a, env, mix)
        return out
    if isinstance(expr, sp.Pow):
        return _num(expr.base, env, mix) ** _num(expr.exp, env, mix)
    if isinstance(expr, W):
        a, b, q = (int(v) for v in expr.args[:3])
        ls = [int(_num(l, env, mix)) for l in expr.args[3:]]
        top = max(ls, default=0)
        return sum((pi**a * hi**b * ri**q for ri, pi, hi in zip(ranks, p, h) if ri >= top), start=0)
    if isinstance(expr, sp.Sum):
        variables = [lim[0] for lim in expr.limits]
        uppers = [int(_num(lim[2], env, mix)) for lim in expr.limits]
        total = 0
        for combo in itertools.product(*(_bands(ranks, u) for u in uppers)):
            sub = dict(env)
            width = 1
            for var, (rep, w) in zip(variables, combo):
                sub[var] = rep
                width *= w
            total = total + width * _num(expr.function, sub, mix)
        return total
    raise ValueError(f"cannot evaluate {expr!r} as a mix sum")


def _mix(ranks: Sequence[int], weights: Sequence[float] | None, profile: Sequence[float] | None,
         exact: bool) -> tuple:
    if not ranks:
        raise ValueError("ranks must list at least one client rank")
    n = len(ranks)
    if weights is None:
        p = [sp.Rational(1, n) if exact else 1.0 / n] * n
    else:
        if len(weights) != n:
            raise ValueError(f"weights has {len(weights)} entries but ranks has {n}; give one weight per client")
        tot = sum(weights)
        p = [sp.nsimplify(w) / sp.nsimplify(tot) if exact else float(w) / float(tot) for w in weights]
    if profile is None:
        h = [sp.Integer(1) if exact else 1.0] * n
    else:
        if len(profile) != n:
            raise ValueError(f"profile has {len(profile)} entries but ranks has {n}; give one per client")
        h = list(profile) if exact else [float(v) for v in profile]
    return tuple(int(r) for r in ranks), p, h, exact


def mix_value(atom: sp.Expr, ranks: Sequence[int], weights: Sequence[float] | None = None,
              profile: Sequence[float] | None = None, client: int | None = None, exact: bool = False) -> object:
    """Value of a mix sum (``W(...)``, ``Sum(...)``, ``R``, ``r_c``, ``p_c``, ``h_c``) for a rank mix.

    ``weights`` are normalised to sum to one (default equal); ``profile`` is ``h_i`` (default 1);
    ``client`` is the index of the fixed client c where a download is evaluated.
    """
    mix = _mix(ranks, weights, profile, exact)
    env: dict = {R_MAX: max(mix[0])}
    if client is not None:
        env.update({R_C: mix[0][client], sp.Symbol("p_c", positive=True): mix[1][client],
                    sp.Symbol("h_c", positive=True): mix[2][client]})
    return _num(atom, env, mix)


def _mix_atoms(expr: sp.Expr) -> set[sp.Expr]:
    atoms = {a for a in expr.atoms(sp.Sum)}
    atoms |= {w for w in expr.atoms(W) if not any(w in s.atoms(W) for s in atoms)}
    atoms |= expr.free_symbols & {R_MAX, R_C, sp.Symbol("p_c", positive=True), sp.Symbol("h_c", positive=True)}
    return atoms


def at_mix(expr: sp.Expr, ranks: Sequence[int], weights: Sequence[float] | None = None,
           profile: Sequence[float] | None = None, client: int | None = None, exact: bool = False) -> sp.Expr:
    """``expr`` with every mix sum replaced by its value for this rank mix (other symbols stay)."""
    subs = {a: sp.sympify(mix_value(a, ranks, weights, profile, client, exact)) for a in _mix_atoms(expr)}
    return expr.xreplace(subs)


def equal_ranks(expr: sp.Expr) -> sp.Expr:
    """``expr`` when every client has rank ``r`` and ``h_i = 1`` (weights stay symbolic: ``S_m``).

    Then ``[l <= r_i] = 1`` for every ``l <= R = r``, so ``W(a, 0, q, ...) = S_a r^q`` and a sum over
    a rank class is ``r`` times its (now constant) summand: the homogeneous closed forms must come back.
    """

    def w_equal(*args: sp.Expr) -> sp.Expr:
        return power_sum(int(args[0])) * SYM.r ** int(args[2])

    def sum_equal(s: sp.Sum) -> sp.Expr:
        return SYM.r ** len(s.limits) * s.function

    out = expr.replace(lambda e: isinstance(e, W), lambda e: w_equal(*e.args))
    out = out.replace(lambda e: isinstance(e, sp.Sum), sum_equal)
    return sp.simplify(out.subs({R_MAX: SYM.r, R_C: SYM.r, sp.Symbol("h_c", positive=True): 1}))


# ---------------------------------------------------------------- the invariance condition


_HOMOGENEOUS = {("zero-pad", "ffa"): "ffa", ("zero-pad", "fedit"): "fedit", ("stack", "ffa"): "ffa",
                ("stack", "fedit"): "exact", ("svd", "ffa"): "ffa", ("svd", "fedit"): "exact"}


@lru_cache(maxsize=None)
def local_profile(scheme: str = "zero-pad", variant: str = "ffa", regime: str = "adam",
                  quantity: str = "adapter_output") -> sp.Expr:
    """``h(r)``: the gamma that keeps ONE client of rank r at its rank-1 size, per unit alpha.

    It is the homogeneous engine's solved invariance at one client (``solve_invariance(...).at_one_client``),
    divided by alpha, so ``h(1) = 1``; under Adam it is ``1 / sqrt(r)`` (rsLoRA per client).
    """
    from sfed_theory.derivation import solve_invariance  # the homogeneous derivation, loaded on use

    inv = solve_invariance(_HOMOGENEOUS[(scheme, variant)], regime, quantity)
    return sp.simplify(inv.at_one_client / SYM.alpha)


@dataclass(frozen=True)
class HeteroInvariance:
    """Invariance of the server's aggregate under ``gamma_i = c * h_i``, solved for ``c``."""

    quantity: str
    scheme: str
    variant: str
    regime: str
    a_init: str
    moment: sp.Expr  # E[quantity] (c and the mix sums W of the profile h)
    reference: sp.Expr  # the same at one rank-1 client with gamma = alpha
    equation: sp.Eq
    roots: tuple[sp.Expr, ...]  # everything sympy.solve returned
    c_star: sp.Expr  # the positive root: alpha * (reference / moment-at-c=1)^(1/power)
    power: int  # degree of c in the moment (2: Adam, 4: SGD)
    profile: sp.Expr  # h(r) from the one-client condition (see local_profile)

    def c_value(self, alpha: float, ranks: Sequence[int], weights: Sequence[float] | None = None,
                profile: Sequence[float] | None = None, **numbers: float) -> float:
        """``c*`` for a rank mix and profile (default: ``h(r_i)`` of :attr:`profile`); ``numbers``
        sets the model symbols the moment still has (``k``, ``s_A``, ``s_dA``, ... by name)."""
        if profile is None:
            profile = [float(self.profile.subs(SYM.r, r)) for r in ranks]
        expr = at_mix(self.c_star, ranks, weights, profile)
        values = {SYM.alpha: alpha, **{s: numbers[s.name] for s in expr.free_symbols if s.name in numbers}}
        out = expr.subs(values)
        if out.free_symbols:
            raise ValueError(f"c* still depends on {sorted(map(str, out.free_symbols))}; pass them by name")
        return float(out)


def _positive_root(roots: Sequence[sp.Expr]) -> sp.Expr:
    point = {s: sp.Rational(3, 7) + n / 5 for n, s in enumerate(sorted(
        set().union(*(z.free_symbols for z in roots)), key=str))}
    good = []
    for z in roots:
        val = complex(z.subs(point).evalf())
        if abs(val.imag) < 1e-12 and val.real > 0:
            good.append(z)
    if len(good) != 1:
        raise RuntimeError(f"expected one positive root for c, sympy returned {roots}")
    return good[0]


@lru_cache(maxsize=None)
def solve_hetero(scheme: str = "zero-pad", variant: str = "ffa", regime: str = "adam", a_init: str = "shared",
                 quantity: str = "adapter_output") -> HeteroInvariance:
    """Solve ``E[quantity](c) / d = E[quantity](one rank-1 client, gamma = alpha) / d`` for ``c``.

    The mix sums are replaced by positive symbols for ``sympy.solve`` and put back in the root.
    """
    q = derive_hetero(quantity, scheme, variant, regime, a_init).result
    if not q.has(C):
        raise ValueError(f"{quantity} [{scheme}/{variant}/{regime}] does not depend on gamma; nothing to solve")
    ref = at_mix(q, [1], None, None, exact=True).subs(C, SYM.alpha)
    atoms = {a: sp.Symbol(f"H{n}", positive=True) for n, a in enumerate(sorted(_mix_atoms(q), key=str))}
    eq = sp.Eq(q.xreplace(atoms) / SYM.d, ref / SYM.d)
    roots = tuple(sp.solve(eq, C))
    root = _positive_root(roots)
    back = {s: a for a, s in atoms.items()}
    return HeteroInvariance(
        quantity, scheme, variant, regime, a_init, q, sp.factor(ref), eq, roots, root.xreplace(back),
        int(sp.degree(sp.expand(q.xreplace(atoms)), C)), local_profile(scheme, variant, regime, quantity),
    )
