"""Exponents in N of the aggregate's size when clients train different ranks: measured beside predicted.

Runs with ``client_ranks`` (:mod:`validation.federated`) are grouped by scheme, optimizer, split, rule and
rank mix (the distinct client ranks, e.g. ``"4,16,64"``; a grid's ``rank_mixes`` cycles one mix to every
N). For each group and quantity the measured slope of ``log(quantity)`` against ``log N`` is fitted as in
:mod:`validation.analysis` (seed-mean of the ``__all__`` value, percentile bootstrap over seeds and
layers). Quantities: ``update_fro`` and ``adapter_rms`` of the round's aggregate; under the canonical
(Adam) model both are proportional to ``sqrt(H(gamma))`` (:func:`sfed_theory.hetero_rules.aggregate_moment`),
so both are predicted by the slope of the aggregate's size:

* ``predicted_rho0``: the size of :func:`sfed_theory.client_scaling_factors` at each N's client ranks
  (its ``size`` at rho = 0), the rule's gammas taken at the run's ``rho``;
* ``predicted_rho_hat``: the same gammas, the size at the measured client correlation (mean
  ``rho_ratio`` of the group's multi-client rows, clipped to [0, 1]; computed on the padded increments,
  it is below the per-column correlation the model uses when ranks differ).

Equal client weights are assumed (weighted runs get NaN predictions).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sfed_theory.hetero_rules import aggregate_moment, client_scaling_factors
from validation.aggregation import HETERO_SCHEME, SCHEME_TRAINS_A
from validation.analysis import TOLERANCE, _cube, _fit_one, is_hetero, loglog_slope
from validation.metrics import ALL

__all__ = ["HETERO_QUANTITIES", "rank_mix", "predicted_size", "fit_hetero_exponents",
           "format_hetero_report"]

HETERO_QUANTITIES: dict[str, str] = {"update_fro": "update_fro", "adapter_output": "adapter_rms"}


def rank_mix(client_ranks: str) -> str:
    """``"4,16,64,4"`` -> ``"4,16,64"``: the distinct ranks, ascending (the mix a grid cycles)."""
    return ",".join(map(str, sorted({int(r) for r in str(client_ranks).split(",")})))


def predicted_size(rule: str, alpha: float, ranks: list[int], scheme: str, *, rule_rho: float = 0.0,
                   rho: float = 0.0) -> float:
    """The aggregate's size (relative to one rank-1 client at gamma = alpha) of harness ``scheme`` under
    ``rule`` (gammas at ``rule_rho``) when the clients' increments correlate by ``rho``."""
    kw = dict(scheme=HETERO_SCHEME[scheme], train_a=SCHEME_TRAINS_A[scheme])
    gammas = client_scaling_factors(rule, alpha, ranks, rho=rule_rho, **kw).clients
    return math.sqrt(aggregate_moment(ranks, gammas, rho=rho, **kw)) / alpha


def _predicted_slope(g: pd.DataFrame, ns: np.ndarray, rho: float) -> float:
    first = g.iloc[0]
    if bool(first.get("weighted", False)) or not math.isfinite(rho):
        return float("nan")
    sizes = []
    for n in ns:
        ranks = [int(r) for r in g.loc[g["n_clients"] == n, "client_ranks"].iloc[0].split(",")]
        sizes.append(predicted_size(first["rule"], float(first["alpha"]), ranks, first["scheme"],
                                    rule_rho=float(first["rho"]), rho=rho))
    return loglog_slope(ns.astype(float), np.asarray(sizes))


def fit_hetero_exponents(df: pd.DataFrame, *, round: int = 1, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (scheme, optimizer, partition, rule, mix, quantity): the measured slope in N with its
    95% CI, ``predicted_rho0``, ``rho_hat`` and ``predicted_rho_hat``, and agreement as in
    :func:`validation.analysis.fit_exponents` (``in_ci_*``, ``agrees_*`` within :data:`TOLERANCE`)."""
    ok = df[is_hetero(df) & ~df["diverged"].astype(bool) & (df["round"] == round)].copy()
    if ok.empty:
        return pd.DataFrame()
    if "partition" not in ok:
        ok["partition"] = "?"
    ok["mix"] = ok["client_ranks"].map(rank_mix)
    rng, out = np.random.default_rng(seed), []
    for key, g in ok.groupby(["scheme", "optimizer", "partition", "rule", "mix"]):
        layers_df, all_df = g[g["layer"] != ALL], g[g["layer"] == ALL]
        ns = np.sort(g["n_clients"].unique())
        if ns.size < 2:
            continue
        seeds, layers = np.sort(g["seed"].unique()), np.sort(layers_df["layer"].unique())
        rho_m = float(all_df.loc[all_df["n_participating"] > 1, "rho_ratio"].clip(0, 1).mean())
        pred0, pred_rho = _predicted_slope(g, ns, 0.0), _predicted_slope(g, ns, rho_m)
        for quantity, col in HETERO_QUANTITIES.items():
            slope, lo, hi, _ = _fit_one(_cube(layers_df, "n_clients", col, ns, seeds, layers), ns.astype(float), n_boot, rng)
            out.append(dict(zip(("scheme", "optimizer", "partition", "rule", "mix"), key), quantity=quantity,
                            column=col, points=",".join(map(str, ns)), n_seeds=seeds.size, n_layers=layers.size,
                            measured=slope, ci_low=lo, ci_high=hi, predicted_rho0=pred0, rho_hat=rho_m,
                            predicted_rho_hat=pred_rho))
    res = pd.DataFrame(out)
    for p in ("rho0", "rho_hat"):
        if not res.empty:
            pred = res[f"predicted_{p}"]
            res[f"in_ci_{p}"] = (res["ci_low"] <= pred) & (pred <= res["ci_high"])
            res[f"agrees_{p}"] = (pred - res["measured"]).abs() <= TOLERANCE
    return res


def format_hetero_report(fits: pd.DataFrame) -> str:
    """A plain-text table of :func:`fit_hetero_exponents`: measured exponent in N [95% CI] beside the
    predicted ones (C: strictly inside the CI, T: within :data:`TOLERANCE`)."""
    if fits.empty:
        return "no exponents in N for client ranks (need runs with client_ranks at >= 2 client counts)"
    lines = ["Exponents in N of the aggregate's size, clients of different ranks: measured [95% CI] vs predicted",
             "  rho=0: sfed_theory.client_scaling_factors' size at each N's ranks; rho^: at the measured rho_ratio"]
    for (scheme, opt, part, mix), g in fits.groupby(["scheme", "optimizer", "partition", "mix"], sort=False):
        lines += ["", f"== scheme={scheme} ({HETERO_SCHEME[scheme]}) optimizer={opt} split={part} rank mix "
                      f"{{{mix}}} N={g['points'].iloc[0]} ==",
                  f"{'quantity':<16}{'rule':<20}{'measured':>9} {'95% CI':<17}{'rho=0':>7}{'rho^':>7}{'@rho^':>7}"
                  "    0   ^"]
        for _, r in g.iterrows():
            ci = f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}]" if math.isfinite(r.ci_low) else "[n/a]"
            mark = lambda p: ("C" if r[f"in_ci_{p}"] else "") + ("T" if r[f"agrees_{p}"] else "") or "-"  # noqa: E731
            lines.append(f"{r.quantity:<16}{r.rule:<20}{r.measured:>+9.3f} {ci:<17}{r.predicted_rho0:>+7.3f}"
                         f"{r.rho_hat:>7.3f}{r.predicted_rho_hat:>+7.3f}    {mark('rho0'):<3} {mark('rho_hat'):<3}")
    return "\n".join(lines)
