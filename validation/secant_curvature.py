"""The refined model's secant curvature along the update, against the harness's measured ``curvature``.

In the refined model the probe gradient moves within the round by ``lambda(r) dW C_g`` (one curvature; ``C_g =
z z^T + nu_g I``, the tokens as the gradient weighs them), so its secant curvature along the update is

    <G_end - G_start, dW> / ||dW||_F^2 = lambda(r) (||dW z||^2 + nu_g ||dW||_F^2) / ||dW||_F^2.

As a ratio of expectations that is ``lambda(r)`` times the derived ``adapter_output`` taken with the output's probe
vector at ``z`` (``kappa = 1``) and the gradient's bulk ``nu_g``, over the derived ``update_fro``: no new closed
form, two checked ones at other arguments. The harness measures the same ratio on the real model (``curvature``,
:mod:`validation.metrics`), which the refined fit never sees; so the slope in r of the measured curvature is a
check of the fitted curvature's rank law (``lam_rank``) together with the model's geometry (``f_in``, ``phi``:
B's coherent part lies along ``A z`` and meets the curvature more fully as r grows). Only absolute sizes are
not compared (the fit has a free scale per quantity). A model whose lambda follows the pilot's measured curvature
(``curvature_measured``) reproduces the pilot's by construction; at N beyond the pilot its slope is the pilot's.
Whether a pilot could tell how the curvature moves with N is :func:`curvature_rise`'s question: the ratio of the
seed-mean curvature between two client counts, with its seed-bootstrap CI.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from validation.analysis import TOLERANCE, loglog_slope
from validation.metrics import ALL
from validation.refined import RefinedParams, pilot_curvature, predict_points

__all__ = ["model_secant_curvature", "measured_rank_slope", "secant_slopes", "measured_n_ratio", "curvature_rise",
           "seed_bootstrap"]


def model_secant_curvature(p: RefinedParams, rule: str, ranks, ns, ks, alpha: float) -> np.ndarray:
    """The model's ``E<G_end - G_start, dW> / E||dW||_F^2`` at grid points (rank, N, K clients averaged).
    ValueError for a saturating model (two curvatures: the shared part's secant is not ``lambda`` times a norm)."""
    if p.saturating:
        raise ValueError("the secant curvature of a saturating model has two curvatures; fit one (t0 = inf)")
    if p.curvature_measured:  # lambda is set at each point so that this ratio is lam times the pilot's measurement
        return p.lam * pilot_curvature(p, rule, ranks)
    along_z = replace(p, kappa=1.0, nu=p.gradient_bulk, nu_g=None)
    response = predict_points(along_z, "adapter_output", rule, ranks, ns, ks, alpha) ** 2
    update = predict_points(along_z, "update_fro", rule, ranks, ns, ks, alpha) ** 2
    return p.curvature(np.asarray(ranks, dtype=float)) * response / update


def measured_rank_slope(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """``(slope, ci_low, ci_high)`` of log mean ``curvature`` over seeds against log rank, from ``rows``
    (one point's runs: columns ``rank``, ``seed``, ``curvature``); the 95% CI resamples the seeds, paired
    across ranks (a seed's runs share their batches). NaN where fewer than two ranks are measured."""
    wide = rows.pivot_table(index="seed", columns="rank", values="curvature", aggfunc="mean").dropna(axis=1, how="all")
    ranks = wide.columns.to_numpy(float)
    if ranks.size < 2:
        return float("nan"), float("nan"), float("nan")
    return seed_bootstrap(wide.to_numpy(float), lambda means: loglog_slope(ranks, means), n_boot, seed)


def seed_bootstrap(values: np.ndarray, statistic, n_boot: int, seed: int) -> tuple[float, float, float]:
    """``(statistic, ci_low, ci_high)`` of ``statistic`` of the column means of ``values`` (seed x column): the 95%
    CI resamples the rows (seeds), paired across the columns; draws where the statistic is not finite are left out."""
    est = float(statistic(np.nanmean(values, axis=0)))
    draws = values[np.random.default_rng(seed).integers(0, len(values), (n_boot, len(values)))]  # (boot, seed, col)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = np.array([statistic(np.nanmean(d, axis=0)) for d in draws], dtype=float)
    boots = boots[np.isfinite(boots)]
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots.size else (np.nan, np.nan)
    return est, float(lo), float(hi)


def secant_slopes(rows: pd.DataFrame, params: dict, quantity: str = "grad_B", round: int = 1,
                  n_boot: int = 1000) -> pd.DataFrame:
    """Per (scheme, partition, rule, N) of ``rows`` (harness rows; the ``__all__`` layer at ``round``): the measured
    curvature's slope in r with its CI, and the model's at the parameters fitted for ``quantity``
    (``params``: :func:`validation.analysis.refined_fits`' dict), split into its geometry (``lam_rank = 0``) and the
    rank law; ``in_ci`` and ``agrees`` (within :data:`validation.analysis.TOLERANCE`) of the model's slope."""
    a = rows[(rows.layer == ALL) & (rows["round"] == round) & rows.curvature.notna()]
    out = []
    for (scheme, opt, part, rule, n), g in a.groupby(["scheme", "optimizer", "partition", "rule", "n_clients"]):
        p = params.get((scheme, opt, part, quantity))
        ranks = np.sort(g["rank"].unique()).astype(float)
        if p is None or rule not in p.s_B or ranks.size < 2:
            continue
        slope, lo, hi = measured_rank_slope(g, n_boot)
        ks = [float(g.loc[g["rank"] == r, "n_participating"].max()) for r in ranks]
        at = dict(rule=rule, ranks=ranks, ns=np.full(ranks.size, float(n)), ks=ks, alpha=float(g.alpha.iloc[0]))
        model = loglog_slope(ranks, model_secant_curvature(p, **at))
        geometry = loglog_slope(ranks, model_secant_curvature(replace(p, lam_rank=0.0), **at))
        out.append({"scheme": scheme, "optimizer": opt, "partition": part, "rule": rule, "n_clients": int(n),
                    "fitted_on": quantity, "measured": slope, "ci_low": lo, "ci_high": hi, "model": model,
                    "model_geometry": geometry, "lam_rank": p.lam_rank, "in_ci": lo <= model <= hi,
                    "agrees": abs(model - slope) <= TOLERANCE})
    return pd.DataFrame(out)


def measured_n_ratio(rows: pd.DataFrame, n_from: int, n_to: int, n_boot: int = 1000,
                     seed: int = 0) -> tuple[float, float, float]:
    """``(ratio, ci_low, ci_high)``: the mean ``curvature`` over seeds at ``n_to`` clients over that at ``n_from``,
    from ``rows`` (one (scheme, split, rule, rank)'s runs: columns ``n_clients``, ``seed``, ``curvature``); the 95%
    CI resamples the seeds, paired across the two N (a ratio of means, not a mean of per-seed ratios). NaN where
    either N is not measured."""
    wide = rows.pivot_table(index="seed", columns="n_clients", values="curvature", aggfunc="mean")
    if n_from not in wide or n_to not in wide:
        return float("nan"), float("nan"), float("nan")
    values = wide[[n_from, n_to]].dropna(how="all").to_numpy(float)
    return seed_bootstrap(values, lambda means: means[1] / means[0], n_boot, seed)


def curvature_rise(rows: pd.DataFrame, steps=((1, 4), (4, 16)), round: int = 1, n_boot: int = 1000) -> pd.DataFrame:
    """Per (scheme, partition, rule, rank) of ``rows`` (harness rows; the ``__all__`` layer at ``round``) and per
    ``(n_from, n_to)`` of ``steps``: :func:`measured_n_ratio` of the measured secant curvature. A pilot whose own
    step (N = 1 to 4) moves it less than its CI's width cannot predict how it moves further out."""
    a = rows[(rows.layer == ALL) & (rows["round"] == round) & rows.curvature.notna()]
    out = []
    for (scheme, part, rule, rank), g in a.groupby(["scheme", "partition", "rule", "rank"]):
        for n_from, n_to in steps:
            ratio, lo, hi = measured_n_ratio(g, n_from, n_to, n_boot)
            if np.isfinite(ratio):
                out.append({"scheme": scheme, "partition": part, "rule": rule, "rank": int(rank), "n_from": n_from,
                            "n_to": n_to, "ratio": ratio, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(out)
