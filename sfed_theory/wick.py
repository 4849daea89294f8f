"""A small moment-algebra engine: index expressions, Wick pairings, delta contraction.

A scalar random quantity is a sum of :class:`Term` s. A term is ``coeff * prod_i p_i * prod entries``
where every index is summed over its range (Einstein convention over *all* indices, since the
quantities are norms and traces). Expectation uses Isserlis' theorem per independent field:
every perfect matching of the field's entries contributes ``variance * prod(delta)`` times, for
per-client fields, ``rho + (1 - rho) delta(i, i')``. Contraction merges indices joined by deltas
(union-find) and evaluates each class: a free range index gives its size, two probe-input
factors give their inner product (``||x||^2``, or ``x . z`` in the refined regime), a client class
with ``m`` weights gives ``S_m = sum_i p_i^m``.

Matrix-valued expressions (:class:`Mat`) build terms lazily with fresh summation indices, so a
product of two copies of the same matrix gets independent dummy indices.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import sympy as sp

from sfed_theory.assumptions import DETERMINISTIC, FIELDS, INNER_PRODUCTS, SYM, GaussianField, power_sum, range_size

__all__ = ["Idx", "Entry", "Term", "Mat", "Pairing", "IndexFactory", "expect", "contract", "term_latex"]

_LETTER = {"d": "j", "k": "m", "r": "l", "1": "o", "N": "i"}


@dataclass(frozen=True, order=True)
class Idx:
    """A summation index over range ``rng``; ``fixed`` marks the fixed client ``c`` (not summed)."""

    rng: str
    n: int
    fixed: bool = False

    def latex(self) -> str:
        if self.fixed:
            return "c"
        return f"{_LETTER[self.rng]}_{{{self.n}}}"


class IndexFactory:
    """Hands out fresh indices, numbered per range, so printed expressions stay readable."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}

    def fresh(self, rng: str) -> Idx:
        self._count[rng] = self._count.get(rng, 0) + 1
        return Idx(rng, self._count[rng])


FIXED_CLIENT = Idx("N", 0, fixed=True)


@dataclass(frozen=True)
class Entry:
    """One tensor entry: a Gaussian field (see FIELDS) or the deterministic input ``x``."""

    field: str
    idx: tuple[Idx, ...]
    client: Idx | None = None

    def latex(self) -> str:
        name = FIELDS[self.field].latex if self.field in FIELDS else self.field  # x, masks: as named
        sup = f"^{{({self.client.latex()})}}" if self.client is not None else ""
        shown = [i for i in self.idx if i.rng != "1"]  # column index of a vector is always 1
        return f"{name}{sup}_{{{' '.join(i.latex() for i in shown)}}}"


@dataclass(frozen=True)
class Term:
    """``coeff * prod(p_i for i in weights) * prod(entries)``, summed over all its indices."""

    coeff: sp.Expr
    entries: tuple[Entry, ...] = ()
    weights: tuple[Idx, ...] = ()

    def __mul__(self, other: Term) -> Term:
        return Term(self.coeff * other.coeff, self.entries + other.entries, self.weights + other.weights)

    def scaled(self, c: sp.Expr) -> Term:
        return Term(self.coeff * c, self.entries, self.weights)


Builder = Callable[[IndexFactory, Idx, Idx], list[Term]]


@dataclass(frozen=True)
class Mat:
    """A random matrix (rows x cols ranges) given by a builder of its (a, b) entry as terms."""

    rows: str
    cols: str
    build: Builder

    @staticmethod
    def field(name: str, client: Idx | None = None) -> Mat:
        f = FIELDS[name]
        if f.per_client != (client is not None):
            raise ValueError(f"field {name!r} per_client={f.per_client} but client={client}")
        return Mat(f.shape[0], f.shape[1], lambda fac, a, b: [Term(sp.Integer(1), (Entry(name, (a, b), client),))])

    @staticmethod
    def vector_x() -> Mat:
        return Mat.vector("x")

    @staticmethod
    def vector(name: str) -> Mat:
        """A deterministic input vector (k x 1) of :data:`~sfed_theory.assumptions.DETERMINISTIC`."""
        if name not in DETERMINISTIC:
            raise ValueError(f"unknown deterministic vector {name!r}; allowed: {', '.join(DETERMINISTIC)}")
        return Mat("k", "1", lambda fac, a, b: [Term(sp.Integer(1), (Entry(name, (a, b)),))])

    @staticmethod
    def zero(rows: str, cols: str) -> Mat:
        return Mat(rows, cols, lambda fac, a, b: [])

    def __matmul__(self, other: Mat) -> Mat:
        if self.cols != other.rows:
            raise ValueError(f"shape mismatch: ({self.rows}x{self.cols}) @ ({other.rows}x{other.cols})")

        def build(fac: IndexFactory, a: Idx, b: Idx) -> list[Term]:
            inner = fac.fresh(self.cols)
            left, right = self.build(fac, a, inner), other.build(fac, inner, b)
            return [t1 * t2 for t1 in left for t2 in right]

        return Mat(self.rows, other.cols, build)

    def __add__(self, other: Mat) -> Mat:
        if (self.rows, self.cols) != (other.rows, other.cols):
            raise ValueError("shape mismatch in +")
        return Mat(self.rows, self.cols, lambda fac, a, b: self.build(fac, a, b) + other.build(fac, a, b))

    def __sub__(self, other: Mat) -> Mat:
        return self + other.scale(sp.Integer(-1))

    def scale(self, c: sp.Expr) -> Mat:
        return Mat(self.rows, self.cols, lambda fac, a, b: [t.scaled(c) for t in self.build(fac, a, b)])

    @property
    def T(self) -> Mat:
        return Mat(self.cols, self.rows, lambda fac, a, b: self.build(fac, b, a))

    @staticmethod
    def client_average(per_client: Callable[[Idx], Mat], rows: str, cols: str) -> Mat:
        """``sum_i p_i M(i)`` with a fresh client index ``i`` per use."""

        def build(fac: IndexFactory, a: Idx, b: Idx) -> list[Term]:
            i = fac.fresh("N")
            return [Term(t.coeff, t.entries, t.weights + (i,)) for t in per_client(i).build(fac, a, b)]

        return Mat(rows, cols, build)


def frobenius_inner(m1: Mat, m2: Mat, fac: IndexFactory | None = None) -> list[Term]:
    """Terms of ``<M1, M2>_F = sum_ab M1_ab M2_ab`` (each factor with its own dummy indices)."""
    if (m1.rows, m1.cols) != (m2.rows, m2.cols):
        raise ValueError("shape mismatch in Frobenius inner product")
    fac = fac or IndexFactory()
    a, b = fac.fresh(m1.rows), fac.fresh(m1.cols)
    left, right = m1.build(fac, a, b), m2.build(fac, a, b)
    return [t1 * t2 for t1 in left for t2 in right]


# ---------------------------------------------------------------- expectation by Wick pairings


@dataclass(frozen=True)
class Pairing:
    """One Wick pairing of one term, after expanding client correlations, and its contraction."""

    term: int  # position of the term in the quantity's term list
    pairs: tuple[tuple[Entry, Entry], ...]
    deltas: tuple[tuple[Idx, Idx], ...]
    coeff: sp.Expr  # coefficient incl. variances and rho / (1 - rho) factors
    value: sp.Expr  # contracted contribution to the expectation

    def text(self) -> str:
        """Plain-text form: the paired entries, the deltas, the contracted value."""
        name = lambda e: e.field + (f"[{e.client.latex()}]" if e.client is not None else "")  # noqa: E731
        pairs = " ".join(f"<{name(a)} {name(b)}>" for a, b in self.pairs)
        deltas = " ".join(f"d({a.latex()},{b.latex()})" for a, b in dict.fromkeys(
            (a, b) for a, b in self.deltas if a != b))
        return f"{pairs} -> {self.coeff} {deltas} -> {self.value}"

    def latex(self) -> str:
        pairs = r"\,".join(rf"\langle {a.latex()}\,{b.latex()}\rangle" for a, b in self.pairs)
        shown = dict.fromkeys((a, b) for a, b in self.deltas if a != b)  # drop trivial and repeated deltas
        deltas = r"".join(rf"\delta_{{{a.latex()} {b.latex()}}}" for a, b in shown)
        return rf"{pairs}\ \to\ {sp.latex(self.coeff)}\,{deltas}\ \to\ {sp.latex(self.value)}"


def _matchings(items: Sequence[int]) -> Iterator[list[tuple[int, int]]]:
    """All perfect matchings of an even-length list (Isserlis' theorem sums over these)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for j in range(len(rest)):
        for tail in _matchings(rest[:j] + rest[j + 1 :]):
            yield [(first, rest[j])] + tail


def _find(parent: dict[Idx, Idx], a: Idx) -> Idx:
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


def contract(term: Term, deltas: Sequence[tuple[Idx, Idx]]) -> sp.Expr:
    """Sum ``prod(deltas) * weights * x-factors`` of ``term`` over all its indices (coefficient excluded)."""
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
    classes: dict[Idx, list[Idx]] = {}
    for i in indices:
        classes.setdefault(_find(parent, i), []).append(i)
    vectors: dict[Idx, list[str]] = {}  # the deterministic vectors' factors in each index class
    for e in term.entries:
        if e.field in DETERMINISTIC:
            vectors.setdefault(_find(parent, e.idx[0]), []).append(e.field)
    w_count: dict[Idx, int] = {}
    for i in term.weights:
        root = _find(parent, i)
        w_count[root] = w_count.get(root, 0) + 1
    value: sp.Expr = sp.Integer(1)
    for root, members in classes.items():
        rng = root.rng
        if rng == "N":
            m = w_count.get(root, 0)
            if any(i.fixed for i in members):
                # the fixed client c (FedSA's own model): quantities are p-weighted means over which
                # client is c, as the harness reports them, so p_c^m averages to sum_c p_c^(m+1)
                value *= power_sum(m + 1)
            elif m == 0:
                value *= SYM.N
            else:
                value *= power_sum(m)
            continue
        names = vectors.get(root, [])
        if not names:
            value *= range_size(rng)
        elif len(names) == 2:
            value *= INNER_PRODUCTS[frozenset(names)]  # x . x, z . z or x . z
        else:
            raise NotImplementedError(f"an index class carrying {len(names)} deterministic vector factors "
                                      f"{names} (only inner products of two are modelled)")
    return value


def expect(terms: Sequence[Term], *, fields: Mapping[str, GaussianField] | None = None,
           contract_fn: Callable[[Term, Sequence[tuple[Idx, Idx]]], sp.Expr] | None = None,
           ) -> tuple[sp.Expr, list[Pairing]]:
    """``E[sum of terms]`` by Isserlis' theorem; returns the (expanded) result and every pairing.

    Entries whose field is in ``fields`` (default :data:`FIELDS`) are paired; every other entry (the
    probe input ``x``, or deterministic factors of an extension) passes through to ``contract_fn``
    (default :func:`contract`), which sums a term over its indices under the pairing's deltas.
    """
    fields = FIELDS if fields is None else fields
    contract_fn = contract if contract_fn is None else contract_fn
    total: sp.Expr = sp.Integer(0)
    records: list[Pairing] = []
    for t_pos, term in enumerate(terms):
        by_field: dict[str, list[int]] = {}
        for pos, e in enumerate(term.entries):
            if e.field in fields:
                by_field.setdefault(e.field, []).append(pos)
        if any(len(v) % 2 for v in by_field.values()):
            continue  # odd moments of a zero-mean Gaussian vanish
        per_field = [list(_matchings(v)) for v in by_field.values()]
        for choice in itertools.product(*per_field):
            pairs = [(term.entries[a], term.entries[b]) for m in choice for a, b in m]
            coeff = term.coeff
            deltas: list[tuple[Idx, Idx]] = []
            client_pairs: list[tuple[Idx, Idx]] = []
            for e1, e2 in pairs:
                coeff *= fields[e1.field].variance
                deltas.extend(zip(e1.idx, e2.idx))
                if e1.client is not None and e1.client != e2.client:
                    # corr + (1 - corr) delta(i, i'), corr the field's client correlation
                    client_pairs.append((e1.client, e2.client, fields[e1.field].correlation))
            for same in itertools.product((False, True), repeat=len(client_pairs)):
                c = coeff
                dl = list(deltas)
                for (i1, i2, corr), s in zip(client_pairs, same):
                    if s:
                        c *= 1 - corr
                        dl.append((i1, i2))
                    else:
                        c *= corr
                if c == 0:
                    continue
                value = c * contract_fn(term, dl)
                records.append(Pairing(t_pos, tuple(pairs), tuple(dl), c, value))
                total += value
    return sp.expand(total), records


def term_latex(term: Term) -> str:
    """LaTeX of one term: coefficient, the summed indices, weights and entries."""
    idx: list[Idx] = []
    for e in term.entries:
        for i in (*e.idx, *((e.client,) if e.client is not None else ())):
            if i not in idx and i.rng != "1" and not i.fixed:
                idx.append(i)
    for i in term.weights:
        if i not in idx and not i.fixed:
            idx.append(i)
    coeff = sp.latex(term.coeff)
    if coeff == "1":
        coeff = ""
    elif coeff == "-1":
        coeff = "-"
    weights = " ".join(f"p_{{{i.latex()}}}" for i in term.weights)
    entries = " ".join(e.latex() for e in term.entries)
    summ = rf"\sum_{{{','.join(i.latex() for i in sorted(idx))}}}" if idx else ""
    return f"{coeff}{summ} {weights} {entries}".strip()
