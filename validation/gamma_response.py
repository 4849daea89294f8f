"""How a round's update responds to gamma at a fixed rank and client count: each rule against a reference rule.

At one (scheme, split, rank, N) the rules differ only in gamma. If the clients' increments did not depend on
gamma (Adam's first local step is the gradient's sign at any gamma), every per-gamma property of the update would be
the same under every rule:

* ``inc_B_rms``: the clients' increment size;
* ``loss_change / gamma``: the first-order change of the probe loss, ``<G_start, dW>``, per unit gamma (``dW`` is
  ``gamma`` times the increments' product): the increments' projection on the probe's descent direction;
* ``curvature``: the secant curvature along the update, ``<G_end - G_start, dW> / ||dW||^2``, gamma-free while the
  probe's gradient responds linearly to the update (it falls where the loss saturates along the step).

:func:`rule_ratios` gives, per such cell, the ratio of each metric's seed mean under a rule to the reference rule's
(LoRA, the smallest gamma), with a seed-paired bootstrap CI: 1 means "gamma changed nothing there". Comparing runs
with one local step (increments exactly gamma-free) and two separates the loss's own saturation from what the
clients' second local step does with gamma.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from validation.metrics import ALL
from validation.secant_curvature import seed_bootstrap

__all__ = ["PER_GAMMA_METRICS", "per_gamma_metrics", "rule_ratios"]

PER_GAMMA_METRICS = ("inc_B_rms", "loss_per_gamma", "curvature")
"""The metrics :func:`rule_ratios` compares (``loss_per_gamma`` is ``loss_change / gamma``)."""

_CELL = ["scheme", "partition", "local_steps", "rank", "n_clients"]


def per_gamma_metrics(rows: pd.DataFrame, round: int = 1) -> pd.DataFrame:
    """The ``__all__`` layer's rows at ``round`` with ``loss_per_gamma = loss_change / gamma`` added."""
    a = rows[(rows.layer == ALL) & (rows["round"] == round)].copy()
    if (a.gamma <= 0).any():
        raise ValueError("gamma must be positive in every row")
    a["loss_per_gamma"] = a.loss_change / a.gamma
    return a


def rule_ratios(rows: pd.DataFrame, reference: str = "lora", metrics=PER_GAMMA_METRICS, round: int = 1,
                n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (scheme, split, local steps, rank, N) cell of ``rows`` (harness rows), per rule other than ``reference``
    and per metric of ``metrics``: ``ratio`` = the metric's seed mean under the rule over the reference's, with the
    95% CI of a bootstrap over the seeds both rules ran (paired: a seed's runs share the clients' batches), and the
    two rules' gammas. A metric not measured in a cell (all NaN) is left out."""
    unknown = set(metrics) - set(PER_GAMMA_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; allowed: {PER_GAMMA_METRICS}")
    a = per_gamma_metrics(rows, round)
    if reference not in set(a.rule):
        raise ValueError(f"no {reference!r} runs to compare with; rules: {sorted(set(a.rule))}")
    out = []
    for cell, g in a.groupby(_CELL):
        ref = g[g.rule == reference]
        for rule, h in g[g.rule != reference].groupby("rule"):
            for metric in metrics:
                row = _ratio(ref, h, metric, n_boot, seed)
                if row is not None:
                    out.append({**dict(zip(_CELL, cell)), "rule": rule, "reference": reference, "metric": metric,
                                "gamma": float(h.gamma.iloc[0]), "gamma_reference": float(ref.gamma.iloc[0]),
                                **row})
    return pd.DataFrame(out)


def _ratio(ref: pd.DataFrame, other: pd.DataFrame, metric: str, n_boot: int, seed: int) -> dict | None:
    wide = pd.concat([ref.groupby("seed")[metric].mean().rename("ref"),
                      other.groupby("seed")[metric].mean().rename("rule")], axis=1, join="inner").dropna()
    if wide.empty:
        return None
    est, lo, hi = seed_bootstrap(wide[["ref", "rule"]].to_numpy(float), lambda m: m[1] / m[0], n_boot, seed)
    return {"ratio": est, "ci_low": lo, "ci_high": hi, "n_seeds": len(wide)}
