"""The measured secant curvature's rank slope against the refined model's, from stored results.

``results/<table>_secant_curvature.csv``: per (scheme, split, rule, N) of the check and per quantity whose fit
supplies the parameters (dL/dB, dL/dA), the slope in r of the measured ``curvature`` (95% seed-bootstrap CI) beside
the model's (:mod:`validation.secant_curvature`), read from the stored refined parameters ``<table>_refined_params.csv``
(written by :mod:`paper_figures.exponent_tables`; the fit never sees the measured curvature)::

    python -m paper_figures.secant_curvature_table [--table gradient_check_two_vectors_rank_curvature]

``--rise`` writes ``results/<check>_curvature_rise.csv`` instead: per (scheme, split, rule, rank) the ratio of the
measured curvature's seed mean from N = 1 to 4 (the pilot's own step) and from 4 to 16, each with its seed-bootstrap
CI (:func:`validation.secant_curvature.curvature_rise`)::

    python -m paper_figures.secant_curvature_table --rise [--check gradient_check]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pandas as pd

from paper_figures.experiments import DEFAULT_RESULTS, load
from paper_figures.exponent_tables import fitted_rows

__all__ = ["secant_table", "rise_table", "main"]

DEFAULT_TABLE = "gradient_check_two_vectors_rank_curvature"


def secant_table(table: str = DEFAULT_TABLE, results: Path = DEFAULT_RESULTS, n_boot: int = 1000) -> pd.DataFrame:
    """The slopes of :func:`validation.secant_curvature.secant_slopes` for the stored parameters ``table``
    (its check: the name up to ``_two_vectors``/``_f_in``/...), at the dL/dB and dL/dA fits. ValueError when the
    stored parameters are missing or were fitted on other rows (rewrite them with the exponent tables first)."""
    from validation.refined_store import read_params
    from validation.secant_curvature import secant_slopes

    check = next((c for c in ("gradient_check_small_lr", "gradient_check_one_step", "gradient_check")
                  if table.startswith(c)), None)
    if check is None:
        raise ValueError(f"{table!r} names no stored check (gradient_check[...]_*)")
    path = results / f"{table}_refined_params.csv"
    params = read_params(path, fitted_rows(check, results))
    if params is None:
        raise ValueError(f"no parameters in {path} fitted on {check}'s stored rows: run paper_figures.exponent_tables")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = load(check, results)
        return pd.concat([secant_slopes(rows, params, q, n_boot=n_boot) for q in ("grad_B", "grad_A")],
                         ignore_index=True)


def rise_table(check: str = "gradient_check", results: Path = DEFAULT_RESULTS, n_boot: int = 1000) -> pd.DataFrame:
    """:func:`validation.secant_curvature.curvature_rise` of a stored check's runs."""
    from validation.secant_curvature import curvature_rise

    return curvature_rise(load(check, results), n_boot=n_boot)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paper_figures.secant_curvature_table",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--table", default=DEFAULT_TABLE, help="the stored refined parameters' stem in results/")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--rise", action="store_true", help="write the curvature's ratios between client counts instead")
    ap.add_argument("--check", default="gradient_check", help="the stored check whose runs --rise reads")
    ns = ap.parse_args(argv)
    if ns.rise:
        rise = rise_table(ns.check, ns.results, ns.n_boot)
        path = ns.results / f"{ns.check}_curvature_rise.csv"
        rise.to_csv(path, index=False)
        for (a, b), g in rise.groupby(["n_from", "n_to"]):
            moved = int(((g.ci_low > 1) | (g.ci_high < 1)).sum())
            print(f"N = {a} -> {b}: ratio {g.ratio.min():.3f}-{g.ratio.max():.3f}, CI width median "
                  f"{(g.ci_high - g.ci_low).median():.3f}; CI excludes 1 at {moved}/{len(g)}")
        print(f"wrote {path}")
        return 0
    out = secant_table(ns.table, ns.results, ns.n_boot)
    path = ns.results / f"{ns.table}_secant_curvature.csv"
    out.to_csv(path, index=False)
    for q, g in out.groupby("fitted_on"):
        print(f"{q} fits: model slope inside the measured CI {int(g.in_ci.sum())}/{len(g)}, "
              f"within 0.05 {int(g.agrees.sum())}/{len(g)}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
