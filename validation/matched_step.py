"""The same gamma taken by fewer clients: is a gradient at the round's end set by the step or by the client count?

SFed's gamma grows with N, so at N = 16 its step along the direction every client descends is larger than any
pilot run's at N <= 4. Runs at a small N with a larger alpha (the grid ``gradient_check_matched_gamma``: N = 4,
alpha 32) take SFed's N = 16 gamma with the same shared step and a noise part sqrt(16/4) = 2 times larger in norm
(the clients' noise averages as 1/K). :func:`matched_step_ratios` sets each such cell beside the reference runs of the
same scheme, split, rule and rank at the same gamma (another N) and at the same N (another gamma): the ratio of the
seed RMS of an end-of-round gradient, with a seed-paired bootstrap CI (a seed fixes the probe and the A init, so
the start gradients of paired cells agree up to gamma). A ratio of 1 against the same gamma says the step sets the
gradient whatever the clients' count, so a large-step pilot at N <= 4 would carry it to N = 16.

If not, the clients' count enters through their noise. Where that part of a squared gradient averages as 1/K at a
fixed gamma, ``E||g||^2 = S + n/K``, two client counts at one gamma (N = 1 and 4, a pilot with large steps) fix S
and n and predict a third (N = 16): :func:`one_over_k_prediction` tests that out of sample.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from validation.metrics import ALL
from validation.secant_curvature import seed_bootstrap

__all__ = ["MATCHED_COLUMNS", "matched_step_ratios", "one_over_k_prediction"]

MATCHED_COLUMNS = ("grad_B_end", "grad_A_end")
"""The end-of-round probe gradients compared by default (where the refined model misses most)."""

_CELL = ["scheme", "partition", "rule", "rank"]


def _round_one(rows: pd.DataFrame) -> pd.DataFrame:
    a = rows[(rows.layer == ALL) & (rows["round"] == 1)]
    return a[~a.diverged.astype(bool)] if "diverged" in a else a


def _squares_by_seed(cells: list[pd.DataFrame], column: str) -> np.ndarray:
    """seed x cell: the squares of ``column`` over the seeds every cell has (the bootstrap pairs them)."""
    if any(c.seed.duplicated().any() for c in cells):
        raise ValueError(f"{column}: duplicate seeds in a cell")
    sq = pd.concat([c.set_index("seed")[column] ** 2 for c in cells], axis=1, join="inner").to_numpy()
    if len(sq) < 2:
        raise ValueError(f"{column}: fewer than two seeds in common ({len(sq)})")
    return sq


def _ratio_with_ci(sq: np.ndarray, statistic, n_boot: int, seed: int) -> dict:
    """``statistic`` of the seed means with its seed-paired 95% CI; where the estimate itself is not finite, no CI
    (one built from the draws where it is would describe another quantity)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        est, lo, hi = seed_bootstrap(sq, statistic, n_boot, seed)
    if not np.isfinite(est):
        lo = hi = np.nan
    return {"n_seeds": len(sq), "ratio": est, "ci_low": lo, "ci_high": hi, "inside": bool(lo <= 1.0 <= hi)}


def matched_step_ratios(reference: pd.DataFrame, matched: pd.DataFrame, *, columns=MATCHED_COLUMNS,
                        n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per cell of ``matched`` (harness rows; the ``__all__`` layer of round 1), column and comparison
    (``against``: ``"same gamma"``, the ``reference`` cell of the same scheme, split, rule and rank with the same gamma
    at another N; ``"same N"``, the one at the same N with another gamma): the ratio of the seed RMS of ``column``,
    matched over reference, its 95% CI (seeds paired), ``inside``: the CI contains 1, both cells' N and gamma, and
    ``per_gamma`` (with ``per_gamma_low``, ``per_gamma_high``): the ratio over the gammas' ratio, the comparison per
    unit gamma (against the same N, 1 says the end gradient grew with gamma as the start gradient does).
    ValueError when a matched cell has no reference at its gamma or at its N, or several."""
    ref, mat = _round_one(reference), _round_one(matched)
    out = []
    for key, m in mat.groupby(_CELL + ["n_clients"]):
        cell = dict(zip(_CELL + ["n_clients"], key))
        gamma = float(m.gamma.iloc[0])
        if not np.allclose(m.gamma, gamma):
            raise ValueError(f"gamma varies within the matched cell {cell}")
        same = ref[np.logical_and.reduce([ref[c] == cell[c] for c in _CELL])]
        targets = {"same gamma": same[np.isclose(same.gamma, gamma) & (same.n_clients != cell["n_clients"])],
                   "same N": same[(same.n_clients == cell["n_clients"]) & ~np.isclose(same.gamma, gamma)]}
        for against, t in targets.items():
            if t.empty or t.n_clients.nunique() != 1 or t.gamma.nunique() != 1:
                raise ValueError(f"{cell} (gamma {gamma:g}): need exactly one reference cell at {against}, found "
                                 f"N = {sorted(t.n_clients.unique())}, gamma = {sorted(t.gamma.unique())}")
            for column in columns:
                out.append({**cell, "gamma": gamma, "alpha": float(m.alpha.iloc[0]), "against": against,
                            "ref_n_clients": int(t.n_clients.iloc[0]), "ref_gamma": float(t.gamma.iloc[0]),
                            "column": column, **_ratio_with_ci(_squares_by_seed([m, t], column),
                                                               lambda mean: np.sqrt(mean[0] / mean[1]), n_boot, seed)})
    res = pd.DataFrame(out)
    if res.empty:
        return res
    unit = res.ref_gamma / res.gamma  # a probe gradient scales with gamma at a fixed adapter (peft's gamma B A)
    return res.assign(per_gamma=res.ratio * unit, per_gamma_low=res.ci_low * unit, per_gamma_high=res.ci_high * unit)


def _one_over_k(pilot_ks: tuple[int, int], target_k: int):
    """``f(m1, m2) -> m3``: the value at ``target_k`` of the line in 1/K through ``(1/k1, m1)`` and ``(1/k2, m2)``."""
    (k1, k2), k3 = pilot_ks, target_k
    w = (1 / k3 - 1 / k2) / (1 / k1 - 1 / k2)
    return lambda m1, m2: m2 + w * (m1 - m2)


def one_over_k_prediction(rows: pd.DataFrame, *, pilot_ks: tuple[int, int] = (1, 4), target_k: int = 16,
                          columns=MATCHED_COLUMNS, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (scheme, partition, rule, rank, gamma) of ``rows`` (harness rows; the ``__all__`` layer of round 1) that
    has runs at both ``pilot_ks`` and ``target_k`` clients, and per column: the seed mean of its square at
    ``target_k`` predicted from the pilot's two, ``E||g||^2 = S + n/K``, against the measured, as ``ratio`` =
    sqrt(predicted/measured) with a 95% CI (seeds common to the three cells, paired; the ratio and its CI NaN where
    the prediction is negative), and ``inside``: the CI contains 1. ValueError when no group has the three client counts."""
    a = _round_one(rows)
    predict = _one_over_k(pilot_ks, target_k)
    ks = (*pilot_ks, target_k)
    out = []
    for key, g in a.groupby(_CELL + ["gamma"]):
        if not set(ks) <= set(g.n_clients):
            continue
        cells = [g[g.n_clients == k] for k in ks]
        for column in columns:
            sq = _squares_by_seed(cells, column)
            out.append({**dict(zip(_CELL + ["gamma"], key)), "column": column,
                        "measured_rms": float(np.sqrt(sq[:, 2].mean())),
                        **_ratio_with_ci(sq, lambda m: np.sqrt(predict(m[0], m[1]) / m[2]), n_boot, seed)})
    if not out:
        raise ValueError(f"no (scheme, split, rule, rank, gamma) group has runs at N = {ks}")
    return pd.DataFrame(out)
