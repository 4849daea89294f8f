"""How the clients' correlation changes with K, the number of clients averaged.

The harness measures, per run, the Frobenius correlation of the clients' increments (``rho_ratio``) and
the correlations of their contributions projected on each quantity (``rho_out``, ``rho_gA``, ``rho_gB``;
:mod:`validation.metrics`). A zero-sum part of the increments (label shares that add up to the global
ones) makes the pairwise correlation ``rho_K = rho_inf - s/(K - 1)`` (docs/THEORY.md); the alternative
``rho_inf - s/K`` is what a part shrinking like one client's share would give. Both laws are fixed by two
pilot client counts and then predict any other K: :func:`k_law_predictions` does that, and
:func:`correlation_by_k` gives the measured means it is scored on.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from validation.metrics import ALL

__all__ = ["CORRELATION_COLUMNS", "K_LAWS", "fit_k_law", "correlation_by_k", "k_law_predictions"]

CORRELATION_COLUMNS: tuple[str, ...] = ("rho_ratio", "rho_out", "rho_gA", "rho_gB")
K_LAWS = {"1/(K-1)": lambda k: 1.0 / (np.asarray(k, dtype=float) - 1.0),
          "1/K": lambda k: 1.0 / np.asarray(k, dtype=float)}
"""The shape of the K-dependent part: ``rho_K = rho_inf - s * law(K)``."""


def fit_k_law(ks, values, law: str = "1/(K-1)") -> tuple[float, float]:
    """``(rho_inf, s)``: least squares of ``values = rho_inf - s * law(K)`` over two or more client counts
    (through both points when there are two)."""
    slope, intercept = np.polyfit(K_LAWS[law](ks), np.asarray(values, dtype=float), 1)
    return float(intercept), float(-slope)


def correlation_by_k(df: pd.DataFrame, *, round: int = 1) -> pd.DataFrame:
    """Tidy ``(scheme, partition, column, K, mean, se, n)``: each correlation column's mean over the runs
    (every rule, rank and seed) at each K > 1, and its standard error (sd / sqrt(n)), from the ``__all__``
    rows of non-diverged runs at ``round``."""
    a = df[(df.layer == ALL) & (df["round"] == round) & (df.n_participating > 1) & ~df.diverged.astype(bool)]
    rows = []
    for (scheme, part, k), g in a.groupby(["scheme", "partition", "n_participating"]):
        for col in CORRELATION_COLUMNS:
            v = g[col].dropna().to_numpy(float) if col in g else np.array([])
            if v.size:
                se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
                rows.append({"scheme": scheme, "partition": part, "column": col, "K": int(k), "mean": float(v.mean()),
                             "se": se, "n": int(v.size)})
    return pd.DataFrame(rows, columns=["scheme", "partition", "column", "K", "mean", "se", "n"])


def k_law_predictions(table: pd.DataFrame, pilot_ks: tuple[int, int], predict_ks) -> pd.DataFrame:
    """Each law of :data:`K_LAWS` through the means at the two ``pilot_ks``, evaluated at ``predict_ks``
    (any real K >= 2): tidy ``(scheme, partition, column, law, K, predicted, rho_inf, s)``, K as a float.
    Groups lacking a pilot K are left out; ``table`` is :func:`correlation_by_k`'s."""
    k1, k2 = pilot_ks
    if k1 == k2 or min(pilot_ks) < 2:
        raise ValueError(f"two different pilot client counts >= 2 are needed, got {pilot_ks}")
    rows = []
    for key, g in table.groupby(["scheme", "partition", "column"]):
        m = g.set_index("K")["mean"]
        if k1 not in m or k2 not in m:
            continue
        for law, f in K_LAWS.items():
            rho_inf, s = fit_k_law([k1, k2], [m[k1], m[k2]], law)
            for k in predict_ks:
                rows.append({**dict(zip(("scheme", "partition", "column"), key)), "law": law, "K": float(k),
                             "predicted": float(rho_inf - s * f(k)), "rho_inf": float(rho_inf), "s": float(s)})
    return pd.DataFrame(rows, columns=["scheme", "partition", "column", "law", "K", "predicted", "rho_inf", "s"])
