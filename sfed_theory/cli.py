"""Command line: ``sfed-theory {derive, solve, table, check, assumptions}``.

Examples::

    sfed-theory table --alpha 16 --rank 256 --clients 16            # gamma of every rule
    sfed-theory table --alpha 16 --rank 256 --clients 16 --rho 0.1 --participating 4
    sfed-theory table --alpha 16 --ranks 4 16 64 --scheme zero-pad      # heterogeneous client ranks
    sfed-theory derive --scheme ffa --regime adam --steps --latex   # index expression, pairings, result
    sfed-theory solve                                               # invariance condition -> gamma*
    sfed-theory check --samples 20000                               # closed form vs Monte Carlo
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Sequence

import sympy as sp

from sfed_theory.assumptions import ASSUMPTIONS, REGIMES, SCHEMES
from sfed_theory.derivation import derive, in_terms_of_c, solve_invariance
from sfed_theory.hetero import A_INITS, QUANTITY_TEXT_H, REGIMES_H, SCHEME_TEXT, VARIANTS, C
from sfed_theory.hetero_rules import HETERO_RULES, HETERO_SCHEMES, client_scaling_factors
from sfed_theory.rules import RULES, effective_clients, scaling_factor
from sfed_theory.schemes import QUANTITIES, QUANTITY_TEXT, check_names

__all__ = ["main", "build_parser"]


def _pos_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _pos_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def _unit(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"rho must lie in [0, 1], got {v}")
    return v


def _weights(text: str) -> list[float]:
    try:
        w = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be comma-separated numbers, got {text!r}") from None
    if not w:
        raise argparse.ArgumentTypeError("weights must list at least one number")
    return w


def _choices(values: Sequence[str]) -> list[str]:
    return [*values, "all"]


def _selected(value: str, allowed: Sequence[str]) -> list[str]:
    return list(allowed) if value == "all" else [value]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    p = argparse.ArgumentParser(prog="sfed-theory", description="Derived moments of aggregated LoRA updates "
                                "and the federated scaling factor gamma.")
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{derive,solve,table,check,assumptions,hetero}")

    d = sub.add_parser("derive", help="derive closed forms (optionally every step)")
    d.add_argument("--scheme", choices=_choices(list(SCHEMES)), default="all")
    d.add_argument("--regime", choices=_choices(list(REGIMES)), default="all")
    d.add_argument("--quantity", choices=_choices(QUANTITIES), default="all")
    d.add_argument("--steps", action="store_true", help="print index expressions and every Wick pairing")
    d.add_argument("--latex", action="store_true", help="print LaTeX instead of plain text")

    s = sub.add_parser("solve", help="solve the invariance condition for gamma")
    s.add_argument("--scheme", choices=_choices(list(SCHEMES)), default="all")
    s.add_argument("--regime", choices=_choices(list(REGIMES)), default="all")
    s.add_argument("--quantity", choices=("adapter_output", "update_fro", "grad_A", "grad_B", "loss_change"),
                   default="adapter_output")
    s.add_argument("--latex", action="store_true")

    t = sub.add_parser("table", help="gamma of every rule for given alpha, rank and clients (or client ranks)")
    t.add_argument("--alpha", type=_pos_float, required=True)
    t.add_argument("--rank", type=_pos_int, default=None, help="one rank for every client (with --clients)")
    t.add_argument("--clients", type=_pos_int, default=None)
    t.add_argument("--ranks", type=_pos_int, nargs="+", default=None,
                   help="one rank per client (heterogeneous ranks; N = number of ranks)")
    t.add_argument("--scheme", choices=HETERO_SCHEMES, default="zero-pad", help="with --ranks: aggregation scheme")
    t.add_argument("--train-a", action="store_true", help="with --ranks: A is trained and aggregated too")
    t.add_argument("--a-init", choices=("shared", "independent"), default="shared",
                   help="with --ranks: one broadcast A, or each client's own A init (stack, svd)")
    t.add_argument("--rho", type=_unit, default=0.0)
    t.add_argument("--participating", type=_pos_int, default=None, help="K of N clients per round")
    t.add_argument("--weights", type=_weights, default=None, help="comma-separated client weights")

    c = sub.add_parser("check", help="closed forms against a Monte Carlo estimate")
    c.add_argument("--scheme", choices=_choices(list(SCHEMES)), default="all")
    c.add_argument("--regime", choices=_choices(list(REGIMES)), default="all")
    c.add_argument("--samples", type=_pos_int, default=20_000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--z", type=_pos_float, default=5.0, help="half-width of the interval in standard errors")
    c.add_argument("--d", type=_pos_int, default=4)
    c.add_argument("--k", type=_pos_int, default=5)
    c.add_argument("--rank", type=_pos_int, default=3)
    c.add_argument("--clients", type=_pos_int, default=4)
    c.add_argument("--participating", type=_pos_int, default=None)
    c.add_argument("--rho", type=_unit, default=0.2)
    c.add_argument("--weights", type=_weights, default=None)
    c.add_argument("--gamma", type=_pos_float, default=0.8)

    sub.add_parser("assumptions", help="list the named assumptions of the random model")

    h = sub.add_parser("hetero", help="heterogeneous client ranks: derived moments and the solved scale c")
    h.add_argument("--scheme", choices=_choices(list(SCHEME_TEXT)), default="all")
    h.add_argument("--variant", choices=_choices(list(VARIANTS)), default="all")
    h.add_argument("--regime", choices=_choices(list(REGIMES_H)), default="all")
    h.add_argument("--a-init", choices=_choices(list(A_INITS)), default="shared")
    h.add_argument("--quantity", choices=_choices(list(QUANTITY_TEXT_H)), default="adapter_output")
    h.add_argument("--steps", action="store_true", help="print index terms and every Wick pairing")
    h.add_argument("--solve", action="store_true", help="also solve the invariance condition for c")
    return p


def _show(expr: sp.Expr, latex: bool) -> str:
    return sp.latex(expr) if latex else str(expr)


def _cmd_derive(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    start = time.perf_counter()
    for regime in _selected(a.regime, list(REGIMES)):
        for scheme in _selected(a.scheme, list(SCHEMES)):
            for q in _selected(a.quantity, QUANTITIES):
                try:
                    check_names(q, scheme, regime)
                except ValueError as err:
                    if "all" in (a.quantity, a.scheme, a.regime):
                        continue  # combination not defined by the model; skip it in a sweep
                    parser.error(str(err))
                dv = derive(q, scheme, regime)
                if a.latex:
                    print(dv.latex() if a.steps else rf"E[\mathrm{{{q}}}]_{{{scheme},{regime}}} = "
                          + sp.latex(in_terms_of_c(dv.result)))
                elif a.steps:
                    print(dv.text(steps=True))
                else:
                    print(f"{q:18s} {scheme:6s} {regime:5s} = {in_terms_of_c(dv.result)}")
    if not a.latex:
        print(f"# c_N = rho + (1 - rho)*S2 = 1/N_eff, S_m = sum_i p_i^m, X2 = ||x||^2; "
              f"derived in {time.perf_counter() - start:.2f} s")
    return 0


def _cmd_solve(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    for regime in _selected(a.regime, list(REGIMES)):
        for scheme in _selected(a.scheme, list(SCHEMES)):
            try:
                inv = solve_invariance(scheme, regime, a.quantity)
            except ValueError as err:
                if "all" in (a.scheme, a.regime):
                    continue  # e.g. loss_change under adam: not defined, skip in a sweep
                parser.error(str(err))
            print(f"[{a.quantity} | {scheme}/{regime}]")
            print(f"  condition : {_show(inv.equation, a.latex)}")
            print(f"  sympy.solve roots: {len(inv.roots)}; positive root gamma* = {_show(inv.gamma_star, a.latex)}")
            print(f"  i.e. gamma*^{inv.power} = {_show(inv.readable(), a.latex)}   (c_N = rho + (1 - rho)*S2)")
            print(f"  rho = 0, equal weights (S2 = 1/N): {_show(inv.at_rho0_equal, a.latex)}")
            print(f"  N = 1:                             {_show(inv.at_one_client, a.latex)}")
            print(f"  rho = 1:                           {_show(inv.at_rho1, a.latex)}")
    return 0


def _cmd_table(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if a.ranks is not None:
        return _cmd_table_ranks(a, parser)
    if a.rank is None or a.clients is None:
        parser.error("table needs --rank and --clients (one rank for all clients), or --ranks R1 R2 ... "
                     "(one rank per client)")
    extra = {"rho": a.rho, "participating": a.participating, "weights": a.weights}
    try:
        n_eff = effective_clients(a.clients, **extra)
        rows = []
        for rule in RULES:
            kw = extra if rule == "sfed-general" else {}
            rows.append((rule, scaling_factor(rule, a.alpha, a.rank, a.clients, **kw)))
    except ValueError as err:
        parser.error(str(err))
    print(f"alpha={a.alpha:g} rank={a.rank} clients={a.clients} rho={a.rho:g} "
          f"participating={a.participating or a.clients} N_eff={n_eff:.4g}")
    print(f"{'rule':14s} {'gamma':>12s}")
    for rule, gamma in rows:
        print(f"{rule:14s} {gamma:12.6g}")
    return 0


def _cmd_table_ranks(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if a.rank is not None:
        parser.error("give either --rank (one rank for all clients) or --ranks (one per client), not both")
    if a.clients is not None and a.clients != len(a.ranks):
        parser.error(f"--clients {a.clients} disagrees with the {len(a.ranks)} ranks given; N is the number of ranks")
    if a.participating is not None:
        parser.error("--participating is not modelled with --ranks: list the ranks of the clients averaged in a round")
    try:
        rows = [client_scaling_factors(rule, a.alpha, a.ranks, scheme=a.scheme, weights=a.weights, rho=a.rho,
                                       train_a=a.train_a, a_init=a.a_init) for rule in HETERO_RULES]
    except ValueError as err:
        parser.error(str(err))
    weights = ",".join(f"{w:.4g}" for w in rows[0].weights) if a.weights else "equal"
    print(f"# alpha={a.alpha:g} ranks={','.join(map(str, a.ranks))} (N={len(a.ranks)}, R={max(a.ranks)}) "
          f"scheme={a.scheme} rho={a.rho:g} weights={weights} A={'trained' if a.train_a else 'frozen'}, "
          f"{a.a_init} init")
    print("# gamma[r]: a client's scaling factor; rescale[r] = server / gamma multiplies its B on download "
          "(divides on upload)")
    print("# size: sqrt(E||dW x||^2) of the server's aggregate over that of one rank-1 client at gamma = alpha")
    head = [f"{'rule':19s}", f"{'server':>10s}", f"{'size':>8s}"]
    head += [f"{f'gamma[{r}]':>11s}" for r in a.ranks] + [f"{f'rescale[{r}]':>12s}" for r in a.ranks]
    print(" ".join(head))
    for s in rows:
        cells = [f"{s.rule:19s}", f"{s.server:10.5g}", f"{s.size:8.5g}"]
        cells += [f"{g:11.5g}" for g in s.clients] + [f"{f:12.5g}" for f in s.rescale]
        print(" ".join(cells))
    return 0


def _cmd_check(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sfed_theory.montecarlo import ModelParams, simulate  # numpy-heavy; only here
    from sfed_theory.predict import expected_value

    try:
        params = ModelParams(d=a.d, k=a.k, r=a.rank, n_clients=a.clients, gamma=a.gamma, rho=a.rho,
                             weights=tuple(a.weights) if a.weights else None, participating=a.participating,
                             s_A=0.7, s_B=1.1, s_dA=0.5, tau=0.9, eta=0.6, x_norm2=1.5)
    except ValueError as err:
        parser.error(str(err))
    print(f"# {params}")
    print(f"{'quantity':18s} {'scheme':6s} {'regime':6s} {'closed form':>12s} {'MC mean':>12s} {'SE':>10s} "
          f"{'z':>6s}  ok")
    bad = 0
    for regime in _selected(a.regime, list(REGIMES)):
        for scheme in _selected(a.scheme, list(SCHEMES)):
            est = simulate(params, scheme, regime, n_samples=a.samples, seed=a.seed)
            for q, e in est.items():
                th = expected_value(q, scheme, regime, params)
                if th == 0:  # an exact zero: the simulation may only show round-off at the update's scale
                    z_txt = "-"
                    ok = abs(e.mean) <= 1e-20 * (1.0 + expected_value("update_fro", scheme, regime, params))
                else:
                    z = (e.mean - th) / e.se if e.se > 0 else float("inf")
                    z_txt, ok = f"{z:.2f}", abs(z) <= a.z
                bad += not ok
                print(f"{q:18s} {scheme:6s} {regime:6s} {th:12.5g} {e.mean:12.5g} {e.se:10.3g} {z_txt:>6s}  "
                      f"{'yes' if ok else 'NO'}")
    print(f"# {bad} disagreement(s) at z = {a.z:g}")
    return 1 if bad else 0


def _cmd_assumptions() -> int:
    for item in ASSUMPTIONS:
        print(f"{item.name:20s} {item.text}")
    for reg in REGIMES.values():
        print(f"regime {reg.name:13s} {reg.text}")
    for sch in SCHEMES.values():
        print(f"scheme {sch.name:13s} {sch.text}")
    for q, text in QUANTITY_TEXT.items():
        print(f"quantity {q:11s} {text}")
    return 0


def _cmd_hetero(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sfed_theory.hetero import NoClosedForm, check_hetero, derive_hetero, solve_hetero

    sweep = "all" in (a.scheme, a.variant, a.regime, a.a_init, a.quantity)
    for combo in itertools.product(_selected(a.quantity, list(QUANTITY_TEXT_H)), _selected(a.scheme, list(SCHEME_TEXT)),
                                   _selected(a.variant, list(VARIANTS)), _selected(a.regime, list(REGIMES_H)),
                                   _selected(a.a_init, list(A_INITS))):
        try:
            check_hetero(*combo)
        except NoClosedForm as err:
            print(f"{combo[0]} [{'/'.join(combo[1:])}]: {err}")
            continue
        except ValueError as err:
            if sweep:
                continue  # combination not defined by the model
            parser.error(str(err))
        dv = derive_hetero(*combo)
        print(dv.text(steps=a.steps))
        if a.solve and combo[0] in ("adapter_output", "update_fro") and dv.result.has(C):
            inv = solve_hetero(*combo[1:], quantity=combo[0])
            print(f"  one-client profile h(r) = {inv.profile}\n  c* = {inv.c_star}")
    print("# W(a, b, q, l...) = sum over clients i with r_i >= every l of p_i^a h_i^b r_i^q; gamma_i = c h_i; "
          "R = max r_i; r_c = the downloading client's rank")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sfed-theory`` console script; returns the exit status."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command == "derive":
        return _cmd_derive(a, parser)
    if a.command == "solve":
        return _cmd_solve(a, parser)
    if a.command == "table":
        return _cmd_table(a, parser)
    if a.command == "check":
        return _cmd_check(a, parser)
    if a.command == "hetero":
        return _cmd_hetero(a, parser)
    return _cmd_assumptions()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
